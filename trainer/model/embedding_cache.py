"""A frozen model's embeddings of texts, kept on disk and memory-mapped, keyed by text id.

A frozen model (an online teacher, a guide) embeds a given text the same way every time, so each
text needs embedding once per run, not once per epoch: the step looks the batch's ids up, embeds
only the texts not found, and adds them. New embeddings wait in memory until `flush_rows` of them
are there (or a checkpoint is saved), then go to disk as a shard: sorted ids and their embeddings,
two `.npy` files that are memory-mapped when read. Memory therefore stays bounded by one shard's
worth, however many texts the data has; lookups search each shard's sorted ids.

The id is the `text_key` of the text exactly as the model sees it, prompt included, so a query
and the same text as a document are separate entries when the prompts differ. Several processes
may share a folder: each writes its own shards and reads everyone's.

`meta.json` records the model the folder belongs to; a folder of another model is refused.

The same store serves models that do not change while they embed (the model of `prep mine`,
`embtrain eval`, a run's start evaluation): `CachingTextEncoder` keeps their embeddings in a
shared folder per model fingerprint (weights and settings, `open_model_cache`), so that the
quickstart's mining and its base evaluation embed the SciFact corpus once, and an unchanged model
never embeds a text twice.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from trainer.errors import RunError


class EmbeddingCache:
    def __init__(self, folder: str | Path, identity: dict, dim: int, rank: int = 0, flush_rows: int = 65536) -> None:
        self.folder = Path(folder)
        self.dim = dim
        self.rank = rank
        self.flush_rows = flush_rows
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        wanted = {**identity, "dim": dim}
        if meta.exists():
            saved = json.loads(meta.read_text())
            if saved != wanted:
                raise RunError(
                    f"{self.folder} holds embeddings of another model ({saved}), not of {wanted}; "
                    "point the cache elsewhere or delete the folder"
                )
        elif rank == 0:
            _write_atomic(meta, json.dumps(wanted, indent=2).encode())
        self.pending_ids: list[np.ndarray] = []
        self.pending_rows: list[np.ndarray] = []
        self.pending: dict[int, int] = {}  # id -> row in the pending arrays, concatenated
        self.shards: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.embedded = 0
        """Texts this process embedded (not found) since it opened the cache."""
        self.refresh()

    def refresh(self) -> None:
        """Open the shards written since the last look (by any process)."""
        for keys_file in sorted(self.folder.glob("*.ids.npy")):
            name = keys_file.name[: -len(".ids.npy")]
            if name not in self.shards:
                self.shards[name] = (
                    np.load(keys_file, mmap_mode="r"),
                    np.load(self.folder / f"{name}.embeddings.npy", mmap_mode="r"),
                )

    def __len__(self) -> int:
        return sum(len(ids) for ids, _ in self.shards.values()) + len(self.pending)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, embeddings (n, dim) float32, zero where not found)."""
        found = np.zeros(len(ids), dtype=bool)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        pending = np.concatenate(self.pending_rows) if self.pending_rows else None
        for i, key in enumerate(ids.tolist()):
            row = self.pending.get(key)
            if row is not None:
                out[i], found[i] = pending[row], True
        for keys, embeddings in self.shards.values():
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            where = np.searchsorted(keys, ids[todo])
            inside = where < len(keys)
            hit = np.zeros(len(todo), dtype=bool)
            hit[inside] = keys[where[inside]] == ids[todo][inside]
            out[todo[hit]] = embeddings[where[hit]]
            found[todo[hit]] = True
        return found, out

    def add(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        start = len(self.pending)
        fresh = [i for i, key in enumerate(ids.tolist()) if key not in self.pending]
        if not fresh:
            return
        self.pending_ids.append(ids[fresh])
        self.pending_rows.append(np.asarray(embeddings[fresh], dtype=np.float32))
        for offset, key in enumerate(ids[fresh].tolist()):
            self.pending[key] = start + offset
        self.embedded += len(fresh)
        if len(self.pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write what waits in memory as a new shard (atomically), and open everyone's new shards."""
        if self.pending:
            ids = np.concatenate(self.pending_ids)
            rows = np.concatenate(self.pending_rows)
            order = np.argsort(ids, kind="stable")
            # unique, so that runs sharing a folder never pair one's ids with another's embeddings
            name = f"r{self.rank}-{len(list(self.folder.glob(f'r{self.rank}-*.ids.npy'))):06d}-{uuid.uuid4().hex[:8]}"
            _save_npy(self.folder / f"{name}.embeddings.npy", rows[order])
            _save_npy(self.folder / f"{name}.ids.npy", ids[order])  # last: a shard counts once its ids are there
            self.pending_ids, self.pending_rows, self.pending = [], [], {}
        self.refresh()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class CachedEncoder(torch.nn.Module):
    """A frozen encoder with an `EmbeddingCache`: `embed(features, ids)` embeds only the rows whose
    ids are not cached yet."""

    def __init__(self, encoder: torch.nn.Module, cache: EmbeddingCache) -> None:
        super().__init__()
        self.encoder = encoder
        self.cache = cache

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def config(self):
        return self.encoder.config

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @torch.no_grad()
    def embed(self, features: dict[str, torch.Tensor], ids: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        from trainer.model.frozen import embed_frozen

        keys = ids.cpu().numpy()
        found, cached = self.cache.lookup(keys)
        out = torch.from_numpy(cached).to(features["input_ids"].device)
        missing = np.flatnonzero(~found)
        if len(missing):
            rows = torch.from_numpy(missing).to(features["input_ids"].device)
            subset = {k: v[rows] for k, v in features.items()}
            length = int(subset["attention_mask"].sum(1).max()) if "attention_mask" in subset else None
            if length is not None:  # drop the padding only the rows left out needed
                left = getattr(self.encoder.tokenizer, "padding_side", "right") == "left"
                subset = {k: (v[:, -length:] if left else v[:, :length]) if v.dim() == 2 else v for k, v in subset.items()}
            fresh = embed_frozen(self.encoder, subset, chunk_size)
            out[rows] = fresh
            self.cache.add(keys[missing], fresh.cpu().numpy())
        return out


# ---------------------------------------------------------------- an unchanged model's embeddings

CACHE_ENV = "EMBTRAIN_EMBEDDING_CACHE"
"""Environment variable: the folder of the shared embedding cache, or `off`."""


def embedding_cache_root() -> Path | None:
    """Where unchanged models keep their embeddings: $EMBTRAIN_EMBEDDING_CACHE, else
    $XDG_CACHE_HOME/embtrain/embeddings or ~/.cache/embtrain/embeddings; None when set to off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embtrain" / "embeddings"


def open_model_cache(model, dim: int, device: str = "cpu", precision: str = "no") -> EmbeddingCache | None:
    """The shared on-disk cache of the embeddings that `model` (a `ModelConfig`), as loaded from
    its files, gives on this kind of device at this autocast precision; None when the cache is off,
    the model cannot be fingerprinted (not a local folder, a fresh latent-attention module), or the
    folder cannot be written (the cache only saves time)."""
    from trainer.evaluation.cache import model_fingerprint

    root = embedding_cache_root()
    if root is None:
        return None
    fingerprint = model_fingerprint(model)
    if fingerprint is None:
        return None
    identity = {"fingerprint": fingerprint, "device": device, "precision": precision}
    name = json.dumps(identity, sort_keys=True)
    import hashlib

    folder = root / hashlib.sha256(name.encode()).hexdigest()[:32]
    try:
        return EmbeddingCache(folder, identity, dim)
    except OSError as exc:
        print(f"warning: embedding cache {folder} not usable ({exc}); embedding without it", file=sys.stderr)
        return None


class CachingTextEncoder:
    """A text encoder (`Encoder.encode`'s signature) that reads the embeddings of texts it has seen
    from an `EmbeddingCache` and embeds only the others, adding them. Only for a model that does not
    change while it is used: the cache is keyed by the model's files (`open_model_cache`)."""

    def __init__(self, inner, config, cache: EmbeddingCache) -> None:
        self.inner = inner
        self.config = config
        self.cache = cache

    def encode(
        self, texts: list[str], *, is_query: bool, batch_size: int = 64, progress: str | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor:
        from trainer.data.training_set import text_key

        if prompt is None:
            prompt = self.config.query_prompt if is_query else self.config.document_prompt
        ids = np.array([text_key(f"{prompt}\x00{text}") for text in texts], dtype=np.int64)
        found, out = self.cache.lookup(ids)
        missing = np.flatnonzero(~found)
        if progress and found.any():
            print(f"{progress}: {int(found.sum())} of {len(texts)} embeddings read from {self.cache.folder}", file=sys.stderr)
        if len(missing):
            fresh = self.inner.encode(
                [texts[i] for i in missing], is_query=is_query, batch_size=batch_size, progress=progress, prompt=prompt
            ).float().numpy()
            out[missing] = fresh
            try:
                self.cache.add(ids[missing], fresh)
                self.cache.flush()
            except OSError as exc:
                print(f"warning: embedding cache {self.cache.folder} not written ({exc})", file=sys.stderr)
        return torch.from_numpy(out)


def cached_text_encoder(encoder, config, device: str = "cpu", precision: str = "no"):
    """`encoder` reading and filling the shared embedding cache of its unchanged model, or `encoder`
    itself when there is none (`open_model_cache`)."""
    cache = open_model_cache(config, encoder.dim, device, precision)
    return encoder if cache is None else CachingTextEncoder(encoder, config, cache)
