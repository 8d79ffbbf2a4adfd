"""InfoNCE over in-batch and hard negatives, with the options of the modern recipes.

Inputs (`LossInput`): query (B, D), positive (B, D), optional negatives (B, N, D); text ids for
masking duplicates; `in_batch` per row; a guide model's embeddings when `guide` is set.

Each query i is scored against every document of the batch (`query_to_doc`: all positives and
all hard negatives, (B, B*(1+N)); its positive is column i), divided by the temperature, and the
loss is the mean cross-entropy of its positive. Further `directions` add candidates:
`doc_to_query` (positive i against every query), `query_to_query` (query i against the other
queries) and `doc_to_doc` (positive i against the documents of other queries). With
`partition: joint` they share one softmax (GTE's improved contrastive loss); with
`per_direction` each direction has its own softmax and their log-normalisers are averaged
(symmetric InfoNCE).

Masked candidates (left out of every softmax, the positive never):
- a candidate whose text is the positive's (by id, across processes; `mask_duplicates`);
- other rows' documents for rows whose source sets `in_batch_negatives: false`;
- with `false_negative_margin`: candidates that the guide model (GISTEmbed), or without a guide
  the model itself (detached), scores above the positive's score minus the margin.

Weighting: `hardness_mode`/`hardness_strength` add strength x the detached score to negative
logits (Lan et al. 2025; EmbeddingGemma applies it to hard negatives only); `focal_gamma`
weighs each query's loss by (1 - p)^gamma with p its detached positive probability
(focal weighting of hard samples, as in KaLM-Embedding); with `focal_gamma_end` the exponent
moves from `focal_gamma` to it over training (progressive sample weighting: every query counts
alike at first, the hard ones more and more, in the spirit of PEG), and `focal_normalize` keeps
the mean weight of a batch at 1 so the loss keeps its scale. `learn_temperature` trains the
temperature within [min_temperature, max_temperature].

Mixed negatives (`mixed_negatives`: M): each query also meets M synthetic negatives, each a random
convex mix of two of its `mix_pool` highest-scored documents other than its positive (masked ones
left out), re-normalised when the model normalises, scored against the query and added to the
query_to_doc softmax. The mixes carry no gradient (only the query moves away from them), as in
MoCHi (Kalantidis et al. 2020) and KaLM-Embedding's online hard-negative mixing; the mixing draws
come from torch's seeded random generator.

References: van den Oord et al. 2018 (CPC); Henderson et al. 2017; Karpukhin et al. 2020 (DPR);
Kalantidis et al. 2020 (MoCHi); Li et al. 2023 (GTE); Günther et al. 2024 (symmetric); Solatorio 2024 (GISTEmbed); Lan et al.
2025; Schechter Vera et al. 2025 (EmbeddingGemma); Hu et al. 2025 (KaLM-Embedding).
Sentence-transformers' MultipleNegativesRankingLoss (directions, partition_mode, hardness_mode)
and GISTEmbedLoss compute the same values (tests/losses/test_infonce.py).

Example::

    loss:
      - kind: infonce
        temperature: 0.05
        directions: [query_to_doc, doc_to_query, query_to_query, doc_to_doc]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from trainer.losses.base import LossConfig, LossContext, LossTerm, register_loss
from trainer.losses.inputs import Embeddings, LossInput
from trainer.model.frozen import FrozenModelConfig, embedding_teacher, frozen_key
from trainer.schema import FieldError

Direction = Literal["query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc"]


@register_loss
@dataclass
class InfoNCEConfig(LossConfig):
    """InfoNCE / multiple-negatives ranking loss over in-batch and hard negatives."""

    kind: Literal["infonce"]
    temperature: float = 0.05
    """Scores (dot products of the encoder's embeddings, i.e. cosine when model.normalize)
    are divided by this; 0.05 equals a scale of 20. The starting value when learned."""
    learn_temperature: bool = False
    """Train the temperature with the model, kept within [min_temperature, max_temperature]."""
    min_temperature: float = 0.01
    """Lower bound of a learned temperature."""
    max_temperature: float = 0.2
    """Upper bound of a learned temperature."""
    directions: list[Direction] = field(default_factory=lambda: ["query_to_doc"])
    """Which candidates each pair is contrasted with: query_to_doc (always), doc_to_query,
    query_to_query, doc_to_doc; all four is GTE's improved contrastive loss."""
    partition: Literal["joint", "per_direction"] = "joint"
    """One softmax over all directions' candidates, or one per direction, averaged (symmetric
    InfoNCE; only with query_to_doc and doc_to_query)."""
    hardness_mode: Literal["none", "in_batch_negatives", "hard_negatives", "all_negatives"] = "none"
    """Which negatives get the hardness weight: other rows' documents, the row's own hard
    negatives (EmbeddingGemma), or both."""
    hardness_strength: float = 0.0
    """alpha: alpha x the detached score is added to those negatives' logits (Lan et al. use 9,
    EmbeddingGemma 5)."""
    focal_gamma: float = 0.0
    """Weigh each query's loss by (1 - p)^gamma, p its detached positive probability; 0: off.
    With focal_gamma_end: gamma at the start of training."""
    focal_gamma_end: float | None = None
    """Progressive weighting: gamma at the end of training, reached from focal_gamma along
    focal_schedule (null: focal_gamma throughout)."""
    focal_schedule: Literal["linear", "cosine"] = "linear"
    """How gamma moves from focal_gamma to focal_gamma_end with the fraction of steps done:
    linearly, or along a half cosine (slow at both ends)."""
    focal_normalize: bool = False
    """Divide the focal weights by their mean over the batch, so that the loss keeps its scale
    while the weighting sharpens."""
    mixed_negatives: int = 0
    """Synthetic hard negatives per query, each a mix of two of its hardest documents
    (KaLM-Embedding, MoCHi); 0: off."""
    mix_pool: int = 8
    """With mixed_negatives: how many of the query's highest-scored negatives the mixes draw from."""
    mask_duplicates: bool = True
    """Leave out candidates whose text equals the positive's (or, among queries, the query's)."""
    false_negative_margin: float | None = None
    """Leave out candidates scored above (positive score - margin): by the guide when set, else
    by the model itself (detached). null: off, or 0.0 when a guide is set."""
    margin_strategy: Literal["absolute", "relative"] = "absolute"
    """absolute: threshold = positive - margin; relative: positive - |positive| x margin."""
    guide: FrozenModelConfig | None = None
    """A frozen embedding model that picks the false negatives (GISTEmbed); it runs without
    gradient, with its own tokenizer and prompts."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise FieldError("temperature", f"must be > 0, got {self.temperature}")
        if self.learn_temperature and not 0 < self.min_temperature < self.temperature < self.max_temperature:
            raise FieldError(
                "temperature",
                f"a learned temperature must start strictly between min_temperature {self.min_temperature} "
                f"and max_temperature {self.max_temperature}, got {self.temperature}",
            )
        if "query_to_doc" not in self.directions:
            raise FieldError("directions", f"must include query_to_doc (it holds the positive), got {self.directions}")
        if len(set(self.directions)) != len(self.directions):
            raise FieldError("directions", f"lists a direction twice: {self.directions}")
        if self.partition == "per_direction" and {"query_to_query", "doc_to_doc"} & set(self.directions):
            raise FieldError(
                "partition",
                "per_direction needs every direction to hold the positive; query_to_query and doc_to_doc do not "
                "(use partition: joint)",
            )
        if self.hardness_strength < 0:
            raise FieldError("hardness_strength", f"must be >= 0, got {self.hardness_strength}")
        if self.hardness_mode != "none" and self.hardness_strength == 0:
            raise FieldError("hardness_strength", f"is 0, so hardness_mode {self.hardness_mode} does nothing; set it > 0")
        if self.focal_gamma < 0:
            raise FieldError("focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        if self.focal_gamma_end is not None and self.focal_gamma_end < 0:
            raise FieldError("focal_gamma_end", f"must be >= 0, got {self.focal_gamma_end}")
        if self.mixed_negatives < 0:
            raise FieldError("mixed_negatives", f"must be >= 0, got {self.mixed_negatives}")
        if self.mix_pool < 2:
            raise FieldError("mix_pool", f"must be >= 2 (a mix needs two negatives), got {self.mix_pool}")
        embedding_teacher("guide", self.guide)
        if self.false_negative_margin is None and self.guide is not None:
            self.false_negative_margin = 0.0

    def build(self, context: LossContext) -> "InfoNCE":
        return InfoNCE(self)


class InfoNCE(LossTerm):
    def __init__(self, config: InfoNCEConfig) -> None:
        super().__init__()
        self.config = config
        self.directions = list(config.directions)
        if config.learn_temperature:
            low, high = config.min_temperature, config.max_temperature
            start = (config.temperature - low) / (high - low)
            self.temperature_logit = torch.nn.Parameter(torch.tensor(math.log(start / (1 - start))))

    @property
    def temperature(self) -> torch.Tensor | float:
        if not self.config.learn_temperature:
            return self.config.temperature
        low, high = self.config.min_temperature, self.config.max_temperature
        return low + (high - low) * torch.sigmoid(self.temperature_logit)

    def frozen_encoders(self) -> dict[str, object]:
        return {frozen_key(self.config.guide): self.config.guide} if self.config.guide is not None else {}

    def forward(self, inputs: LossInput) -> torch.Tensor:
        config = self.config
        scores = similarity_blocks(inputs.embeddings, self.directions)  # {direction: (B, C)}
        masks = candidate_masks(inputs, self.directions, config.mask_duplicates)
        if config.false_negative_margin is not None:
            scorer = inputs.frozen[frozen_key(config.guide)] if config.guide is not None else inputs.embeddings.map(torch.Tensor.detach)
            extra = margin_masks(scorer, self.directions, config.false_negative_margin, config.margin_strategy)
            masks = {d: masks[d] | extra[d] for d in masks}
        logits = {}
        for direction, block in scores.items():
            block = at_least_float32(block) / self.temperature
            if direction == "query_to_doc" and config.hardness_mode != "none":
                penalty = config.hardness_strength * at_least_float32(scores[direction].detach())
                block = block + penalty * hardness_columns(config.hardness_mode, block.shape[0], inputs.num_negatives, block.device)
            logits[direction] = block.masked_fill(masks[direction], -math.inf)
        if config.mixed_negatives:
            mixed = mixed_negative_scores(inputs, logits["query_to_doc"].detach(), config.mixed_negatives, config.mix_pool)
            logits["query_to_doc"] = torch.cat([logits["query_to_doc"], at_least_float32(mixed) / self.temperature], dim=1)
        rows = torch.arange(inputs.query.shape[0], device=inputs.query.device)
        positive = logits["query_to_doc"][rows, rows]  # (B,)
        if config.partition == "joint":
            log_normaliser = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)
        else:
            log_normaliser = torch.stack([torch.logsumexp(b, dim=1) for b in logits.values()]).mean(0)
        losses = log_normaliser - positive  # (B,)
        gamma = focal_gamma(config, inputs.progress)
        if gamma > 0:
            probability = torch.exp(-losses.detach())
            weights = (1 - probability).clamp(min=0) ** gamma
            if config.focal_normalize:
                weights = weights / weights.mean().clamp(min=torch.finfo(weights.dtype).tiny)
            losses = losses * weights
        return losses.mean()


def focal_gamma(config: InfoNCEConfig, progress: float) -> float:
    """The focal exponent at this fraction of training: focal_gamma, or on its way to focal_gamma_end."""
    if config.focal_gamma_end is None:
        return config.focal_gamma
    ramp = progress if config.focal_schedule == "linear" else (1 - math.cos(math.pi * progress)) / 2
    return config.focal_gamma + (config.focal_gamma_end - config.focal_gamma) * ramp


def mixed_negative_scores(inputs: LossInput, logits: torch.Tensor, count: int, pool: int) -> torch.Tensor:
    """(B, count) scores of synthetic negatives: for each query, random convex mixes of two of its
    `pool` highest-scored documents in `logits` (B, B*(1+N)), its positive and masked ones left
    out; the mixes are detached, so only the query gets a gradient. A mix drawn from a masked slot
    (a query with fewer candidates than the pool) scores -inf."""
    size, device = logits.shape[0], logits.device
    rows = torch.arange(size, device=device)
    candidates = logits.clone()
    candidates[rows, rows] = -math.inf
    pool = min(pool, candidates.shape[1] - 1)
    if pool < 2:
        return logits.new_full((size, count), -math.inf)
    best, columns = candidates.topk(pool, dim=1)  # (B, pool)
    first = torch.randint(pool, (size, count), device=device)
    second = (first + 1 + torch.randint(pool - 1, (size, count), device=device)) % pool  # another slot
    alpha = torch.rand(size, count, 1, device=device)
    documents = inputs.embeddings.documents.detach()
    mixed = alpha * documents[columns.gather(1, first)] + (1 - alpha) * documents[columns.gather(1, second)]  # (B, M, D)
    if inputs.normalized:
        mixed = F.normalize(mixed, dim=-1)
    scores = torch.einsum("bd,bmd->bm", inputs.query, mixed.to(inputs.query.dtype))
    usable = torch.isfinite(best.gather(1, first)) & torch.isfinite(best.gather(1, second))
    return scores.masked_fill(~usable, -math.inf)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision scores in float32 for the softmax; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def similarity_blocks(embeddings: Embeddings, directions: list[str]) -> dict[str, torch.Tensor]:
    """Dot products of each direction's anchors (rows) with its candidates (columns):
    query_to_doc (B, B*(1+N)), doc_to_query (B, B), query_to_query (B, B), doc_to_doc (B, B*(1+N))."""
    query, positive, documents = embeddings.query, embeddings.positive, embeddings.documents
    blocks = {"query_to_doc": query @ documents.T}
    if "doc_to_query" in directions:
        blocks["doc_to_query"] = positive @ query.T
    if "query_to_query" in directions:
        blocks["query_to_query"] = query @ query.T
    if "doc_to_doc" in directions:
        blocks["doc_to_doc"] = positive @ documents.T
    return {d: blocks[d] for d in directions}


def document_owner(size: int, num_negatives: int, device: torch.device) -> torch.Tensor:
    """(B*(1+N),) the row each document belongs to: positives 0..B-1, then N negatives per row."""
    rows = torch.arange(size, device=device)
    return torch.cat([rows, rows.repeat_interleave(num_negatives)])


def candidate_masks(inputs: LossInput, directions: list[str], mask_duplicates: bool) -> dict[str, torch.Tensor]:
    """True where a candidate must be left out: self pairs of the same-type directions, other
    rows' documents for rows without in-batch negatives, and duplicates of the positive's text."""
    size, device = inputs.query.shape[0], inputs.query.device
    rows = torch.arange(size, device=device)
    owner = document_owner(size, inputs.num_negatives, device)
    own_document = owner[None, :] == rows[:, None]  # (B, B*(1+N))
    same_row = rows[None, :] == rows[:, None]  # (B, B)
    alone = ~inputs.in_batch[:, None]  # rows that only see their own documents
    masks = {
        "query_to_doc": alone & ~own_document,
        "doc_to_query": alone & ~same_row,
        "query_to_query": same_row | alone,
        "doc_to_doc": own_document | alone,
    }
    if mask_duplicates:
        documents = inputs.document_ids[None, :]
        duplicate_document = (documents == inputs.positive_ids[:, None]) | (
            (inputs.query_ids[owner][None, :] == inputs.query_ids[:, None]) & (owner[None, :] != rows[:, None])
            & (torch.arange(owner.shape[0], device=device) < size)[None, :]
        )  # the positive's text again, or the positive of another row with the same query text
        duplicate_query = inputs.query_ids[None, :] == inputs.query_ids[:, None]
        masks["query_to_doc"] |= duplicate_document & ~positive_column(size, owner.shape[0], device)
        masks["doc_to_doc"] |= duplicate_document
        masks["doc_to_query"] |= duplicate_query & ~same_row
        masks["query_to_query"] |= duplicate_query
    return {d: masks[d] for d in directions}


def positive_column(size: int, columns: int, device: torch.device) -> torch.Tensor:
    """(B, C) True at (i, i): the positive's own column."""
    eye = torch.zeros(size, columns, dtype=torch.bool, device=device)
    eye[:, :size] = torch.eye(size, dtype=torch.bool, device=device)
    return eye


def margin_masks(scorer: Embeddings, directions: list[str], margin: float, strategy: str) -> dict[str, torch.Tensor]:
    """Candidates that `scorer` (the guide, or the model detached) rates above the pair's own
    score minus the margin (GISTEmbed), for each direction; the positive itself never."""
    pair = (scorer.query * scorer.positive).sum(-1)  # (B,) the scorer's query-positive score
    threshold = pair - margin if strategy == "absolute" else pair - pair.abs() * margin
    masks = {}
    for direction, block in similarity_blocks(scorer, directions).items():
        above = block > threshold[:, None]
        if direction in ("query_to_doc", "doc_to_query"):
            above &= ~positive_column(block.shape[0], block.shape[1], block.device)
        masks[direction] = above
    return masks


def hardness_columns(mode: str, size: int, num_negatives: int, device: torch.device) -> torch.Tensor:
    """(B, B*(1+N)) 1.0 at the query_to_doc columns that get the hardness weight, else 0."""
    owner = document_owner(size, num_negatives, device)
    rows = torch.arange(size, device=device)
    own = owner[None, :] == rows[:, None]
    is_hard_negative = (torch.arange(owner.shape[0], device=device) >= size)[None, :]
    if mode == "in_batch_negatives":
        chosen = ~own
    elif mode == "hard_negatives":
        chosen = own & is_hard_negative
    else:  # all_negatives
        chosen = ~(own & ~is_hard_negative)
    return chosen.float()
