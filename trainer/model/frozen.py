"""Frozen auxiliary encoders: a model that embeds the batch's texts inside the training step,
without gradient, with its own tokenizer, prompts and precision (a GISTEmbed guide; an online
teacher for distillation). It is not trained, not checkpointed and not wrapped for DDP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from trainer.schema import FieldError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FrozenModelConfig:
    """A frozen model used inside the training step: an embedding model, or a cross-encoder."""

    name_or_path: str
    """Model folder, embtrain checkpoint, Hub id or package:NAME; embedded with the settings
    saved with it (pooling, prompts, length), like `embtrain eval` does."""
    scorer: Literal["embedding", "cross_encoder"] = "embedding"
    """embedding: it embeds texts and scores by dot product; cross_encoder: a sequence classifier
    that reads each (query, document) pair (score distillation only: distill_kl, margin_mse)."""
    label: str | None = None
    """A cross-encoder's relevant label, by name or index; null: found from its config (see
    `embtrain prep score`)."""
    max_seq_length: int | None = None
    """Truncate its inputs to this many tokens; null: the length saved with the model."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of its weights (bf16/fp16 halve its memory; fp16 needs a GPU)."""
    trust_remote_code: bool = False
    """Let a model that names its own code run it (only for models you trust)."""
    cache: bool = True
    """Keep its embeddings (a cross-encoder: its pair scores) on disk, keyed by text, so that each
    text is embedded once per run, not once per epoch (in the run folder's teacher_cache/, kept
    across resumes)."""
    cache_dir: str | None = None
    """A cache folder of your own instead, shared by runs: `embtrain prep embed` fills it ahead
    of training. It remembers its model and refuses another."""

    def __post_init__(self) -> None:
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise FieldError("max_seq_length", f"must be >= 1 or null, got {self.max_seq_length}")


def frozen_key(config: FrozenModelConfig) -> str:
    """One name per distinct frozen model: terms that name the same model share its embeddings."""
    if config.scorer == "cross_encoder":
        return f"{config.name_or_path}|{config.max_seq_length}|{config.dtype}|cross_encoder|{config.label}"
    return f"{config.name_or_path}|{config.max_seq_length}|{config.dtype}"


def embedding_teacher(field: str, config: FrozenModelConfig | None) -> None:
    """Refuse a cross-encoder where a term needs embeddings."""
    if config is not None and config.scorer != "embedding":
        raise FieldError(field, f"needs an embedding model; {config.name_or_path} is set as scorer: {config.scorer}")


def cache_name(config: FrozenModelConfig) -> str:
    """A folder name for the model's embedding cache."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config.name_or_path).name or config.name_or_path).strip("-")[:40]
    return f"{slug}-{hashlib.sha256(frozen_key(config).encode()).hexdigest()[:10]}"


def cache_identity(config: FrozenModelConfig) -> dict:
    """What makes two caches interchangeable: the model, its length and precision, and its weight
    files (name, size, modification time), so that a retrained model at the same path is not
    taken for the old one."""
    from trainer.model.encoder import locate_model

    weights = []
    folder = Path(locate_model(config.name_or_path))
    if folder.is_dir():
        for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("model/*.safetensors")]):
            stat = path.stat()
            weights.append([path.name, stat.st_size, stat.st_mtime_ns])
    identity = {"model": config.name_or_path, "max_seq_length": config.max_seq_length, "dtype": config.dtype, "weights": weights}
    if config.scorer == "cross_encoder":
        identity |= {"scorer": config.scorer, "label": config.label}
    return identity


def load_frozen(config: FrozenModelConfig):
    """The model as an `Encoder` (a cross-encoder: a `CrossEncoderScorer`) in eval mode with gradients off."""
    from trainer.model.encoder import Encoder, embedding_config

    if config.scorer == "cross_encoder":
        from trainer.model.cross_encoder import load_cross_encoder

        return load_cross_encoder(config)

    settings = embedding_config(config.name_or_path, config.trust_remote_code)
    if config.max_seq_length is not None:
        settings.max_seq_length = config.max_seq_length
    encoder = Encoder.from_config(settings)
    encoder.to(DTYPES[config.dtype])
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


@torch.no_grad()
def embed_frozen(encoder, features: dict[str, torch.Tensor], chunk_size: int | None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) float32 embeddings of tokenised texts, in chunks of `chunk_size` rows (all at once:
    None); an encoder with an embedding cache (`CachedEncoder`) embeds only the ids it lacks."""
    if ids is not None and hasattr(encoder, "cache"):
        return encoder.embed(features, ids, chunk_size)
    total = features["input_ids"].shape[0]
    size = chunk_size or total
    parts = [encoder({k: v[i : i + size] for k, v in features.items()}) for i in range(0, total, size)]
    return torch.cat(parts).float()
