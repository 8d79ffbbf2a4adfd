"""Frozen auxiliary encoders: a model that embeds the batch's texts inside the training step,
without gradient, with its own tokenizer, prompts and precision (a GISTEmbed guide; an online
teacher for distillation). It is not trained, not checkpointed and not wrapped for DDP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainer.schema import FieldError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FrozenModelConfig:
    """A frozen embedding model used inside the training step."""

    name_or_path: str
    """Model folder, embtrain checkpoint, Hub id or package:NAME; embedded with the settings
    saved with it (pooling, prompts, length), like `embtrain eval` does."""
    max_seq_length: int | None = None
    """Truncate its inputs to this many tokens; null: the length saved with the model."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of its weights (bf16/fp16 halve its memory; fp16 needs a GPU)."""
    trust_remote_code: bool = False
    """Let a model that names its own code run it (only for models you trust)."""

    def __post_init__(self) -> None:
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise FieldError("max_seq_length", f"must be >= 1 or null, got {self.max_seq_length}")


def frozen_key(config: FrozenModelConfig) -> str:
    """One name per distinct frozen model: terms that name the same model share its embeddings."""
    return f"{config.name_or_path}|{config.max_seq_length}|{config.dtype}"


def load_frozen(config: FrozenModelConfig):
    """The model as an `Encoder` in eval mode with gradients off."""
    from trainer.model.encoder import Encoder, embedding_config

    settings = embedding_config(config.name_or_path, config.trust_remote_code)
    if config.max_seq_length is not None:
        settings.max_seq_length = config.max_seq_length
    encoder = Encoder.from_config(settings)
    encoder.to(DTYPES[config.dtype])
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


@torch.no_grad()
def embed_frozen(encoder, features: dict[str, torch.Tensor], chunk_size: int | None) -> torch.Tensor:
    """(B, D) float32 embeddings of tokenised texts, in chunks of `chunk_size` rows (all at once: None)."""
    total = features["input_ids"].shape[0]
    size = chunk_size or total
    parts = [encoder({k: v[i : i + size] for k, v in features.items()}) for i in range(0, total, size)]
    return torch.cat(parts).float()
