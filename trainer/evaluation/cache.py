"""Cache of evaluation results for unchanged models (the base model before training).

The key covers the weight files' content, the encoder settings and the evaluation set's
settings, so any change to either gives a fresh evaluation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from trainer.config import EvalSetConfig, ModelConfig
from trainer.model.encoder import resolve_model_path

CACHE_VERSION = 1


def _weights_digest(folder: Path) -> str | None:
    files = sorted(p for p in folder.glob("*") if p.suffix in {".safetensors", ".bin"})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(model: ModelConfig, eval_set: EvalSetConfig) -> str | None:
    """None when the model is not a local folder (nothing to fingerprint)."""
    folder = Path(resolve_model_path(model.name_or_path))
    if not folder.is_dir():
        return None
    weights = _weights_digest(folder)
    if weights is None:
        return None
    # only what changes the embeddings
    settings = {k: getattr(model, k) for k in ("pooling", "normalize", "max_seq_length", "query_prompt", "document_prompt")}
    eval_settings = asdict(eval_set)
    eval_settings["path"] = str(Path(eval_set.path).resolve())
    blob = json.dumps([CACHE_VERSION, weights, settings, eval_settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class EvalCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str | None) -> dict[str, float] | None:
        if key is None:
            return None
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str | None, metrics: dict[str, float]) -> None:
        if key is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{key}.json").write_text(json.dumps(metrics))
