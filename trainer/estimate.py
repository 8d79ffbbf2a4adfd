"""Memory a training step needs, estimated before a run: `embtrain estimate RECIPE`.

Weights, gradients and AdamW state follow from the parameter counts (trainable ones only for
gradients and optimiser state, so LoRA shrinks them), sharded over the processes by ZeRO stage
(1: optimiser state, 2: and gradients, 3 / FSDP: and weights). Activations are not guessed from
a formula: the model is built and run on *fake* tensors (PyTorch's FakeTensorMode: shapes and
dtypes, no memory, no compute) on the step's real shapes (every text at max_seq_length, the worst
case), and the tensors autograd keeps for the backward pass are added up. That covers whatever
the architecture, attention kernel, dropout, precision and LoRA do.

- Plain step: the activations of every column of the batch (queries, positives, negatives).
- Cached loss (`training.grad_cache_chunk_size`): one chunk's activations at a time, plus the
  batch's embeddings and their gradients.
- Gradient checkpointing: each layer keeps only its input, plus one layer's activations while it
  is recomputed.
- The backward pass holds one more layer's worth of activation gradients at its peak.

On a CPU the process's own baseline (the libraries, tokenizer, data) is added, since the measured
figure there is resident memory; on a GPU the figure is memory allocated by PyTorch (the CUDA
context, about 0.5 GB, comes on top).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from trainer.config import Recipe

GiB = 2**30
CPU_BASELINE_BYTES = int(0.85 * GiB)
"""Resident memory of a training process before its model and batch (Python, PyTorch,
transformers, the tokenizer, the data): measured on Linux at 0.85-0.95 GB."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETY_MARGIN = 1.25
"""The estimate errs low, by up to about 20% against peaks measured on a CPU (README): a fit
check asks for 25% more than it."""
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
"""The CUDA context and kernels, which a GPU needs beyond the memory PyTorch allocates."""


@dataclass
class Estimate:
    """Bytes per process of each part of a training step's peak."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    frozen: int
    baseline: int
    total_parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.frozen + self.baseline

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer state (AdamW)", self.optimizer),
                ("activations", self.activations), ("frozen models (teachers, guides)", self.frozen),
                ("process baseline (CPU)", self.baseline)]


@dataclass
class StepShape:
    """The texts one step embeds per process, at their longest."""

    batch_size: int
    documents_per_query: int
    """1 + hard negatives; 0 for a batch of single texts."""
    max_seq_length: int
    chunk_size: int | None
    """The cached loss's chunk, in texts; None: the plain step."""


def step_shape(recipe: Recipe, notes: list[str] | None = None) -> StepShape:
    negatives = recipe.data.num_negatives
    if negatives is None:
        from trainer.data.errors import DataError

        try:
            negatives = _negatives_in_data(recipe)
        except DataError as exc:  # a recipe for data elsewhere: estimated all the same
            negatives = 1
            if notes is not None:
                notes.append(f"the training data could not be read ({exc}); assumed 1 hard negative per query (set data.num_negatives)")
    paired = any(s.kind != "texts" for s in recipe.data.train)
    return StepShape(recipe.data.batch_size, (1 + negatives) if paired else 0, recipe.model.max_seq_length,
                     recipe.training.grad_cache_chunk_size)


def _negatives_in_data(recipe: Recipe) -> int:
    """The most hard negatives per row among the training sources (the data is read)."""
    from trainer.data.readers import read_source

    return max((read_source(source).num_negatives or 0 for source in recipe.data.train), default=0)


def _fake_backbone(model_config, num_layers: int | None = None):
    """The recipe's backbone (cut, dropouts, LoRA, kernel) built on fake tensors: its parameters
    take no memory."""
    from transformers import AutoModel

    from trainer.model.encoder import attention_kernel, dropout_settings, keep_first_layers, keep_layers, read_backbone_config

    path, config = read_backbone_config(model_config)
    for name, value in dropout_settings(path, model_config, config)[0].items():  # config: an exported adapter's base
        setattr(config, name, value)
    options = {"trust_remote_code": model_config.trust_remote_code}
    kernel = attention_kernel(model_config.attn_implementation) if model_config.attn_implementation != "flash_attention_2" else "sdpa"
    if kernel is not None:
        options["attn_implementation"] = kernel
    dtype = getattr(torch, model_config.torch_dtype) if model_config.torch_dtype not in (None, "auto") else torch.float32
    with _default_dtype(dtype):
        try:
            backbone = AutoModel.from_config(config, add_pooling_layer=False, **options)
        except TypeError:
            backbone = AutoModel.from_config(config, **options)
    if model_config.layers is not None:  # the recipe's cut, as training makes it
        keep_layers(backbone, model_config.layers, model_config.name_or_path)
    if model_config.num_layers is not None:
        keep_first_layers(backbone, model_config.num_layers, model_config.name_or_path)
    if num_layers is not None:
        keep_first_layers(backbone, num_layers, model_config.name_or_path)
    config = backbone.config  # as cut
    if model_config.lora is not None:
        from unittest import mock

        from peft.tuners.tuners_utils import BaseTunerLayer

        from trainer.model.lora import add_lora

        # peft moves each new adapter to its layer's device; fake tensors are already there and cannot be moved
        with mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda self, *a, **k: None), \
                mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
            backbone = add_lora(backbone, model_config.lora, gradient_checkpointing=False)
    return backbone, config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def saved_activation_bytes(
    backbone, rows: int, length: int, autocast: torch.dtype | None, grad: bool = True, recompute: bool = False,
    cpu_training: bool = False,
) -> int:
    """Bytes autograd keeps for the backward pass of one forward over (rows, length) tokens,
    parameters excluded (under FakeTensorMode: `backbone` is fake). `recompute`: activation
    outputs are not kept (model.recompute_activations). `cpu_training`: a training forward on a
    CPU, which picks the attention kernel as the encoder does (`attention_backend`)."""
    if rows == 0:
        return 0
    from trainer.model.encoder import attention_backend
    from trainer.model.recompute import ActivationRecompute

    parameters = {id(p.untyped_storage()) for p in backbone.parameters()}
    kept: list[torch.Tensor] = []
    recomputed = ActivationRecompute(backbone) if recompute else None

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if recomputed is None or recomputed.keeps(tensor):
            kept.append(tensor)
        return tensor

    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.ones(rows, length, dtype=torch.long)
    context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    recording = recomputed.recording() if recomputed is not None else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context, torch.set_grad_enabled(grad), recording:
            weights = next(backbone.parameters()).dtype
            with attention_backend(length, torch.device("cpu"), weights, cpu_training):
                backbone(input_ids=ids, attention_mask=mask)
    finally:
        if recomputed is not None:
            recomputed.remove()
    storages = {}
    for tensor in kept:
        storage = tensor.untyped_storage()
        if id(storage) not in parameters:
            storages[id(storage)] = (storage, storage.nbytes())  # each storage once, however often it is kept
    return sum(size for _, size in storages.values())


def estimate(recipe: Recipe, *, world_size: int = 1, zero_stage: int = 0, device: str = "cpu",
             gradient_checkpointing: bool | None = None, chunk_size: int | None = -1) -> Estimate:
    """The peak memory of one process for the recipe's step; `chunk_size` -1 keeps the recipe's,
    None forces the plain step. `gradient_checkpointing` None keeps the recipe's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model_config = recipe.model
    notes: list[str] = []
    shape = step_shape(recipe, notes)
    if chunk_size != -1:
        shape.chunk_size = chunk_size
    checkpointing = model_config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    from trainer import precision

    device_type = "cuda" if torch.cuda.is_available() and not recipe.training.cpu else "cpu"
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.resolve(recipe.training.mixed_precision, device_type))
    with FakeTensorMode(allow_non_fake_inputs=True):
        backbone, config = _fake_backbone(model_config)
        backbone.train()
        parameters = list(backbone.parameters())
        total = sum(p.numel() for p in parameters)
        trainable = [p for p in parameters if p.requires_grad]
        weight_bytes = sum(p.numel() * p.element_size() for p in parameters)
        trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
        trainable_count = sum(p.numel() for p in trainable)
        length = shape.max_seq_length
        documents = shape.batch_size * shape.documents_per_query
        layers = getattr(config, "num_hidden_layers", 1) or 1
        recompute = model_config.recompute_activations and not checkpointing
        kernel = {"cpu_training": device_type == "cpu" and not checkpointing}  # the encoder's attention kernel
        if shape.chunk_size is None:
            columns = [(shape.batch_size, length), (documents, length)]
            full = sum(saved_activation_bytes(backbone, rows, cols, autocast, recompute=recompute, **kernel) for rows, cols in columns)
            biggest = max(columns)
        else:  # one chunk at a time, the longest texts being the worst chunk
            biggest = (min(shape.chunk_size, max(shape.batch_size, documents)), length)
            full = saved_activation_bytes(backbone, *biggest, autocast, recompute=recompute, **kernel)
        one_layer = _per_layer(config, model_config, biggest, autocast, **kernel)
        if checkpointing:
            hidden = getattr(config, "hidden_size", 0)
            element = 2 if autocast is not None else DTYPE_BYTES.get(str(next(iter(parameters)).dtype).removeprefix("torch."), 4)
            tokens = (shape.batch_size + documents) * length if shape.chunk_size is None else biggest[0] * biggest[1]
            activations = tokens * hidden * element * layers + one_layer
        else:
            activations = full
        activations += one_layer  # the backward pass's activation gradients at their largest
        dim = getattr(config, "hidden_size", 0)
        texts = shape.batch_size + documents
        activations += texts * dim * 4 * 3  # embeddings, their gradients, the loss's similarity rows (small)
        if shape.chunk_size is not None:
            activations += shape.batch_size * max(documents, 1) * world_size * 4 * 2  # the cached loss's score matrix and gradient
    frozen = _frozen_weight_bytes(recipe)
    shard = max(world_size, 1)
    weights = weight_bytes // shard if zero_stage >= 3 else weight_bytes
    gradients = trainable_bytes // shard if zero_stage >= 2 else trainable_bytes
    optimizer_bytes = 2 * trainable_count * 4  # AdamW's two moments, kept in float32
    if any(p.dtype != torch.float32 for p in trainable):
        optimizer_bytes = 2 * trainable_bytes
    optimizer = optimizer_bytes // shard if zero_stage >= 1 else optimizer_bytes
    baseline = CPU_BASELINE_BYTES if device == "cpu" else 0
    if device != "cpu":
        notes.append("GPU figures are memory allocated by PyTorch; the CUDA context adds about 0.5 GB")
    return Estimate(weights, gradients, optimizer, activations, frozen, baseline, total, trainable_count, notes)


def _per_layer(config, model_config, shape: tuple[int, int], autocast, cpu_training: bool = False) -> int:
    """One transformer layer's saved activations for `shape`: the difference between the backbone
    cut to two layers and to one."""
    one, _ = _fake_backbone(model_config, num_layers=1)
    if (getattr(config, "num_hidden_layers", 1) or 1) < 2:
        one.train()
        return saved_activation_bytes(one, *shape, autocast, cpu_training=cpu_training)
    two, _ = _fake_backbone(model_config, num_layers=2)
    one.train(), two.train()
    return max(0, saved_activation_bytes(two, *shape, autocast, cpu_training=cpu_training)
               - saved_activation_bytes(one, *shape, autocast, cpu_training=cpu_training))


def _frozen_weight_bytes(recipe: Recipe) -> int:
    """Weights of the frozen models the loss terms name (teachers, guides), in their precision."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.config import ModelConfig
    from trainer.model.frozen import FrozenModelConfig

    found: dict[str, FrozenModelConfig] = {}

    def walk(value) -> None:
        if isinstance(value, FrozenModelConfig):
            found[value.name_or_path] = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                walk(getattr(value, name))

    walk(recipe.loss)
    total = 0
    for config in found.values():
        settings = ModelConfig(name_or_path=config.name_or_path, trust_remote_code=config.trust_remote_code)
        with FakeTensorMode(allow_non_fake_inputs=True):
            backbone, _ = _fake_backbone(settings)
            count = sum(p.numel() for p in backbone.parameters())
        total += count * {"fp32": 4, "bf16": 2, "fp16": 2}[config.dtype]
    return total


def needed(value: Estimate, device: str) -> int:
    """What a device must have for the step: the estimate with the safety margin, and on a GPU
    the CUDA context."""
    return int(value.total * SAFETY_MARGIN) + (CUDA_CONTEXT_BYTES if device == "gpu" else 0)


def suggest_chunk_size(recipe: Recipe, budget: int, *, device: str, **options) -> int | None:
    """The largest power-of-two cached-loss chunk whose step fits `budget` bytes (`needed`); None if none does."""
    size = 1 << int(math.log2(max(recipe.data.batch_size, 1) * 4))
    while size >= 1:
        if needed(estimate(recipe, chunk_size=size, device=device, **options), device) <= budget:
            return size
        size //= 2
    return None


def training_steps(recipe: Recipe, world_size: int) -> tuple[int, int] | str:
    """(steps per epoch, steps in all) as the run's sampler will give them; without the data, why."""
    from trainer.data.errors import DataError
    from trainer.data.readers import read_training_data
    from trainer.data.sampler import NoDuplicatesBatchSampler

    try:
        examples = read_training_data(recipe.data.train, recipe.data.num_negatives)
    except DataError as exc:
        return str(exc)
    sampler = NoDuplicatesBatchSampler(  # every process gets as many batches as process 0
        examples.keys, recipe.data.batch_size, seed=recipe.seed, shuffle=recipe.data.shuffle, num_replicas=world_size,
        rank=0, weights=[s.weight for s in recipe.data.train] if recipe.data.train[0].weight is not None else None,
        homogeneous=recipe.data.batching == "homogeneous", accumulation_steps=recipe.training.gradient_accumulation_steps,
    )
    per_epoch = len(sampler) // recipe.training.gradient_accumulation_steps
    return per_epoch, recipe.training.max_steps or recipe.training.epochs * per_epoch


def gigabytes(value: int) -> str:
    return f"{value / GiB:.2f} GB"
