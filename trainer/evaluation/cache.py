"""Cache of evaluation results for unchanged models (the base model before training).

The key covers the weight files' content, the encoder settings, the evaluation set's settings
and the content of the evaluation files, so a change to any of them gives a fresh evaluation.
Entries are written atomically; one that cannot be read counts as missing and is rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from trainer.config import EvalSetConfig, ModelConfig
from trainer.model.encoder import latent_attention_weights, resolve_model_path

CACHE_VERSION = 4


def _files_digest(files: list[Path]) -> str:
    """The files' content, computed once per process for files unchanged since (same size and
    modification time): the eval cache and the embedding cache both key on a model's weights."""
    stamps = tuple((str(path.absolute()), *_stamp(path)) for path in files)
    return _digest_of(stamps)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _digest_of(stamps: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        path = Path(name)
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _weights_digest(folder: Path) -> str | None:
    """The weights' content; for a LoRA adapter folder, with its settings (the base and its cut)
    and the base's own weights."""
    from trainer.model.encoder import ENCODER_FILE
    from trainer.model.lora import ADAPTER_CONFIG, adapter_base, holds_adapter

    files = sorted(p for p in folder.glob("*") if p.suffix in {".safetensors", ".bin"})
    if not files:
        return None
    if not holds_adapter(folder):
        return _files_digest(files)
    settings_file = folder / ENCODER_FILE
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.exists() else {}
    base = Path(resolve_model_path(adapter_base(folder, settings)["name_or_path"]))
    base_digest = _weights_digest(base) if base.is_dir() else None
    if base_digest is None:
        return None
    described = [f for f in (settings_file, folder / ADAPTER_CONFIG) if f.exists()]  # the base, the cut, alpha, targets
    return _files_digest(files + described) + base_digest


def model_fingerprint(model: ModelConfig) -> str | None:
    """A digest of what decides the embeddings a model loaded from its files gives: the weights'
    content and every setting that can change an embedding. None when the model is not a local
    folder, or starts partly at random (nothing stable to key on)."""
    folder = Path(resolve_model_path(model.name_or_path))
    if not folder.is_dir():
        return None
    weights = _weights_digest(folder)
    if weights is None:
        return None
    if model.pooling == "latent_attention" and latent_attention_weights(folder) is None:
        return None  # the module starts at random (seeded by the run): nothing stable to cache
    # the files' content stands for their path; every model setting but those that cannot change an
    # embedding, so a new setting is keyed by default (and `lora`: fresh adapters start as the
    # identity, peft initialising B at zero; dropouts act in training only)
    unchanging = ("name_or_path", "gradient_checkpointing", "recompute_activations", "trust_remote_code", "lora", "attention_dropout", "hidden_dropout")
    settings = {k: v for k, v in asdict(model).items() if k not in unchanging}
    blob = json.dumps([weights, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(
    model: ModelConfig, eval_set: EvalSetConfig, dims: list[int] | None = None, device: str = "cpu", precision: str = "no"
) -> str | None:
    """None when the model cannot be fingerprinted (`model_fingerprint`). The kind of device and
    the autocast precision are part of the key: bf16 scores differ from float32 ones."""
    fingerprint = model_fingerprint(model)
    if fingerprint is None:
        return None
    eval_settings = {k: v for k, v in asdict(eval_set).items() if k not in ("name", "path")}  # names are prefixes
    data = _files_digest(eval_set.files())
    computed = [] if (device, precision) == ("cpu", "no") else [device, precision]  # keys of float32 on a CPU as before
    blob = json.dumps([CACHE_VERSION, fingerprint, eval_settings, data] + ([sorted(dims)] if dims else []) + computed, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class EvalCache:
    """One JSON file of metrics per key in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str | None) -> dict[str, float] | None:
        if key is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
            _warn(f"evaluation cache {path} unreadable ({exc}); evaluating again")
            return None
        if not (isinstance(values, dict) and all(isinstance(v, (int, float)) for v in values.values())):
            _warn(f"evaluation cache {path} does not hold metrics; evaluating again")
            return None
        return values

    def put(self, key: str | None, metrics: dict[str, float]) -> None:
        if key is None:
            return
        try:
            _write_atomically(self.folder / f"{key}.json", json.dumps(metrics))
        except OSError as exc:  # the cache only saves time: a failed write must not stop a run
            _warn(f"evaluation cache not written to {self.folder}: {exc}")


def _write_atomically(path: Path, text: str) -> None:
    """Write a temporary file next to `path` and rename it, so that a reader never sees half a file.
    The temporary name is unique: runs that share the cache folder may write the same entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
