"""Latent-attention pooling (NV-Embed, Lee et al. 2024, arXiv:2405.17428).

Each token state attends to a trainable array of latent vectors (the tokens are the queries, the
latents the keys and values), then passes an MLP, each with a residual connection and a layer
norm before it; the results are mean-pooled over the real tokens.

This file imports only torch (and sentence-transformers for `LatentAttentionPooling`): `embtrain
export` copies it into the exported folder, so that sentence-transformers runs the very code the
trainer ran (`SentenceTransformer(DIR, trust_remote_code=True)`).
"""

from __future__ import annotations

import torch

WEIGHTS_FILE = "latent_attention.safetensors"
"""The module's weights in an embtrain model folder."""
ST_TYPE = "latent_attention.LatentAttentionPooling"
"""Its type in an exported folder's modules.json: this file, copied there, and its class."""


class LatentAttention(torch.nn.Module):
    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, mlp_dim: int | None = None) -> None:
        super().__init__()
        self.hidden_size, self.num_latents, self.num_heads = hidden_size, num_latents, num_heads
        self.mlp_dim = mlp_dim or hidden_size
        self.latents = torch.nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)
        self.norm_tokens = torch.nn.LayerNorm(hidden_size)
        self.norm_latents = torch.nn.LayerNorm(hidden_size)
        self.attention = torch.nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm_mlp = torch.nn.LayerNorm(hidden_size)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden_size, self.mlp_dim), torch.nn.GELU(), torch.nn.Linear(self.mlp_dim, hidden_size)
        )

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states (B, L, H) and the mask of the tokens to pool (B, L) to (B, H)."""
        states = states.to(self.latents.dtype)  # a half-precision backbone feeds a float32 head
        latents = self.norm_latents(self.latents).unsqueeze(0).expand(states.shape[0], -1, -1)
        attended, _ = self.attention(self.norm_tokens(states), latents, latents, need_weights=False)
        states = states + attended  # (B, L, H)
        states = states + self.mlp(self.norm_mlp(states))
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def settings(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_latents": self.num_latents, "num_heads": self.num_heads, "mlp_dim": self.mlp_dim}


try:  # the sentence-transformers module of an exported folder
    from sentence_transformers.base.modules import Module
except ImportError:  # pragma: no cover - sentence-transformers before 6
    Module = None

if Module is not None:

    class LatentAttentionPooling(Module):
        """Pooling module of a sentence-transformers folder: token embeddings to `sentence_embedding`."""

        config_keys = ["hidden_size", "num_latents", "num_heads", "mlp_dim", "include_prompt"]

        def __init__(
            self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, mlp_dim: int | None = None,
            include_prompt: bool = True,
        ) -> None:
            super().__init__()
            self.hidden_size, self.num_latents, self.num_heads, self.mlp_dim = hidden_size, num_latents, num_heads, mlp_dim
            self.include_prompt = include_prompt
            self.pool = LatentAttention(hidden_size, num_latents, num_heads, mlp_dim)

        def forward(self, features: dict, **kwargs) -> dict:
            mask = features["attention_mask"]
            if not self.include_prompt and "prompt_length" in features:  # instruction tokens are not pooled
                length = torch.as_tensor(features["prompt_length"], device=mask.device).reshape(-1)[:1]
                first = mask.long().argmax(dim=1)  # the first real token (left padding)
                positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
                mask = mask * (positions >= (first + length).unsqueeze(1)).to(mask.dtype)
            features["sentence_embedding"] = self.pool(features["token_embeddings"], mask)
            return features

        def get_sentence_embedding_dimension(self) -> int:
            return self.hidden_size

        def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
            self.save_config(output_path)
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)

        @classmethod
        def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
                 local_files_only: bool = False, **kwargs):
            hub = {"token": token, "cache_folder": cache_folder, "revision": revision, "local_files_only": local_files_only}
            config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
            model = cls(**{k: config[k] for k in cls.config_keys if k in config})
            return cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=model, **hub)
