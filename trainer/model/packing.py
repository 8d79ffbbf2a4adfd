"""Packed forwards: several texts share one row of the transformer's input, each attending only
to itself, so that short texts are embedded with almost no padding in few, large matrix products.

A chunk of N texts is placed into R rows of W tokens (best fit, longest first): each text keeps
its own position ids (0, 1, ...) and a block-diagonal attention mask (causal within the block
for causal models) keeps it from seeing its row neighbours. The backbone's token states (R, W,
H) are then gathered back to one padded row per text (N, L, H) and pooled as usual, so every
pooling, prompt exclusion and per-layer output works unchanged. In exact arithmetic the
embeddings, loss and gradients are those of the padded forward.

Whether a model runs packed rows correctly (it must take `position_ids` and a 4D attention
mask) is checked once, by trying: `packing_support`.
"""

from __future__ import annotations

import bisect
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

Features = dict[str, torch.Tensor]

PACKED = "packed:"
"""Prefix of a packed chunk's backbone inputs (R, W): packed:input_ids, packed:position_ids, ..."""
SEGMENTS = "packing:segments"
"""(R, W) which text of the chunk each packed position holds; -1 for padding."""
INDEX = "packing:index"
"""(N, L) the flat position (row x W + column) of each text's tokens; 0 past a text's end."""


@dataclass(frozen=True)
class PackingSupport:
    """How a backbone takes packed rows (found by `packing_support`)."""

    causal: bool
    """Causal models: a text's tokens see only earlier tokens of the same text."""
    additive_mask: bool
    """Eager attention adds the mask to its scores: 0 / the dtype's minimum instead of booleans."""
    position_offset: int = 0
    """The position id of a text's first token (RoBERTa's count from its padding id + 1)."""


@dataclass(frozen=True)
class Placement:
    """Where each text of a chunk goes in its packed rows."""

    width: int
    """W: the row length."""
    rows: int
    """R: the number of rows."""
    starts: list[int]
    """Per text, its first flat position (row x W + column)."""


class Rows:
    """Rows of `width` tokens filled text by text, each into the fullest row it fits in (best
    fit; given texts longest first, best fit decreasing)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.used: list[int] = []  # tokens taken in each row
        self.free: list[tuple[int, int]] = []  # (free tokens, row) of rows with room, sorted

    def needs_new_row(self, length: int) -> bool:
        return bisect.bisect_left(self.free, (length, -1)) == len(self.free)

    def add(self, length: int) -> int:
        """Place a text of `length` tokens; its first flat position."""
        if length > self.width:
            raise ValueError(f"a text of {length} tokens does not fit rows of {self.width}")
        k = bisect.bisect_left(self.free, (length, -1))
        if k == len(self.free):
            row = len(self.used)
            self.used.append(0)
        else:
            row = self.free.pop(k)[1]
        start = row * self.width + self.used[row]
        self.used[row] += length
        if self.used[row] < self.width:
            bisect.insort(self.free, (self.width - self.used[row], row))
        return start


def place(lengths: list[int], width: int) -> Placement:
    """Best fit decreasing of texts of `lengths` into rows of `width` tokens."""
    rows, starts = Rows(width), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        starts[i] = rows.add(lengths[i])
    return Placement(width, len(rows.used), starts)


def pack(chunk: Features, placement: Placement, position_offset: int = 0) -> Features:
    """The chunk's texts (N, L), right or left padded, packed into rows as `placement` says.
    Keeps `attention_mask` as each text's own mask (N, L'), now right-padded, for pooling and
    counting; per-text extras (N,) stay as they are. Where every token goes is worked out on
    the host from the mask (one transfer from the device) and sent back without waiting
    (pinned, non-blocking copies on a GPU)."""
    mask = chunk["attention_mask"].bool()
    device, (count, width) = mask.device, mask.shape
    host = mask.cpu()
    lengths = host.sum(dim=1)
    first = torch.where(lengths > 0, host.long().argmax(dim=1), 0)  # each text's first column (left padding)
    longest = int(lengths.max()) if count else 0
    columns = torch.arange(longest)
    text_mask = columns.unsqueeze(0) < lengths.unsqueeze(1)  # (N, L')
    starts = torch.tensor(placement.starts, dtype=torch.long)
    index = torch.where(text_mask, starts.unsqueeze(1) + columns.unsqueeze(0), 0)  # (N, L') flat packed position
    destination = index[text_mask]  # each real token's flat packed position, texts in order
    size = placement.rows * placement.width
    source = torch.full((size,), -1, dtype=torch.long)  # per packed position: its flat (N x L) source, -1: padding
    source[destination] = (torch.arange(count).unsqueeze(1) * width + first.unsqueeze(1) + columns.unsqueeze(0))[text_mask]
    positions = torch.zeros(size, dtype=torch.long)
    positions[destination] = columns.expand_as(text_mask)[text_mask] + position_offset
    segments = torch.full((size,), -1, dtype=torch.long)
    segments[destination] = torch.arange(count).unsqueeze(1).expand_as(text_mask)[text_mask]
    moved = torch.stack([source, positions, segments]).view(3, placement.rows, placement.width)
    moved = moved.pin_memory() if device.type == "cuda" else moved
    source, positions, segments = moved.to(device, non_blocking=True)
    index, text_mask = (index.pin_memory(), text_mask.pin_memory()) if device.type == "cuda" else (index, text_mask)
    real = source >= 0

    out: Features = {}
    for key, value in chunk.items():
        if key == "attention_mask":
            continue
        if value.ndim == 2 and value.shape[1] == width:  # input_ids, token_type_ids, ...
            out[PACKED + key] = torch.where(real, value.reshape(-1)[source.clamp(min=0)], 0)
        else:
            out[key] = value
    out[PACKED + "position_ids"] = positions
    out[SEGMENTS] = segments
    out[INDEX] = index.to(device, non_blocking=True)
    out["attention_mask"] = text_mask.to(device, non_blocking=True).to(chunk["attention_mask"].dtype)
    return out


def is_packed(chunk: Features) -> bool:
    return SEGMENTS in chunk


def processed_tokens(chunk: Features) -> int:
    """Token positions the forward of a chunk runs, padding included."""
    return (chunk[SEGMENTS] if is_packed(chunk) else chunk["attention_mask"]).numel()


def backbone_inputs(chunk: Features, support: PackingSupport, dtype: torch.dtype) -> Features:
    """The backbone's keyword arguments for a packed chunk: the packed tensors and a 4D mask
    (R, 1, W, W) in which each text sees only itself (padding positions see only themselves,
    so that no row of the mask is empty)."""
    segments = chunk[SEGMENTS]
    width = segments.shape[1]
    allowed = (segments.unsqueeze(2) == segments.unsqueeze(1)) & (segments.unsqueeze(1) >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    if support.causal:
        allowed &= torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    mask = allowed.unsqueeze(1)
    if support.additive_mask:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    inputs = {k.removeprefix(PACKED): v for k, v in chunk.items() if k.startswith(PACKED)}
    inputs["attention_mask"] = mask
    return inputs


def unpack(states: torch.Tensor, chunk: Features) -> torch.Tensor:
    """Packed token states (R, W, H) back to one padded row per text (N, L', H)."""
    return states.reshape(-1, states.shape[-1])[chunk[INDEX]]


CHECK_TEXTS = ["a short text", "a second text, a little longer than the first one", "three"]
"""What `packing_support` embeds packed and padded (tokenised by the model's tokenizer)."""


def sliding_window(config) -> int | None:
    """The attention window of a model that limits some layers to one (Mistral, Gemma 3,
    ModernBERT's local layers), else None. A 4D mask replaces the model's own, window included."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if isinstance(window, int) and (window > 0 or any("sliding" in str(t) for t in layer_types)):
        return window
    return None


@contextmanager
def dropout_off(module: torch.nn.Module) -> Iterator[None]:
    """Every dropout of `module` at 0 for a while (nn.Dropout modules and the attention
    probability settings of transformers' attention modules), the module left in its mode."""
    saved: list[tuple[object, str, float]] = []
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd):
            saved.append((sub, "p", sub.p))
        for name in ("dropout_prob", "attention_dropout", "attn_dropout", "dropout_p"):
            if isinstance(sub.__dict__.get(name), float):
                saved.append((sub, name, sub.__dict__[name]))
    for owner, name, _ in saved:
        setattr(owner, name, 0.0)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def packing_support(
    embed: Callable[[Features, PackingSupport | None], torch.Tensor],
    features: Features,
    backbone: torch.nn.Module,
    max_length: int,
) -> tuple[PackingSupport | None, str]:
    """How `backbone` runs packed rows, found by trying, or None and why not. The texts of
    `features` (CHECK_TEXTS tokenised) embedded packed into one row must give their padded
    embeddings within rounding, with a bidirectional mask or else a causal one (and positions
    from 0, or from RoBERTa's padding id + 1), in training mode with gradients on and dropout at
    0, as training runs them. Models with an attention window shorter than `max_length` are
    refused without trying (the packed mask would drop the window). `embed(features, support)`
    runs the encoder with that support."""
    config = getattr(backbone, "config", None)
    window = sliding_window(config)
    if window is not None and window < max_length:
        return None, f"its attention window ({window} tokens) is shorter than model.max_seq_length ({max_length})"
    implementation = getattr(config, "_attn_implementation", None)
    padding_id = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    offsets = [0] + ([padding_id + 1] if isinstance(padding_id, int) else [])  # RoBERTa's positions start there
    parameter = next(backbone.parameters())
    tolerance = 1e-4 if parameter.dtype in (torch.float32, torch.float64) else 3e-2
    was_training = backbone.training
    backbone.train()
    try:
        with dropout_off(backbone), torch.enable_grad(), torch.autocast(parameter.device.type, enabled=False):
            features = {k: v.to(parameter.device) for k, v in features.items()}
            placement = place(features["attention_mask"].sum(dim=1).tolist(), int(features["attention_mask"].sum()))
            reference = embed(features, None).detach().float()
            scale = reference.abs().max().clamp(min=1e-6)
            for causal, offset in itertools.product((False, True), offsets):
                support = PackingSupport(causal, implementation == "eager", offset)
                packed = embed(pack(features, placement, offset), support).detach().float()
                if packed.shape == reference.shape and (packed - reference).abs().max() / scale <= tolerance:
                    return support, ""
        return None, "it does not give the same embeddings with packed rows (it needs position_ids and 4D attention masks)"
    except Exception as exc:  # any model code may fail on inputs it does not take (flash_attention_2, sharded weights)
        return None, f"it cannot run packed rows ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        backbone.train(was_training)
