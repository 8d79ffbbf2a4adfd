"""Model soup: average the weights of several fine-tuned models of one architecture.

    embtrain merge checkpoints/a/best checkpoints/b/best [--weights 0.7 0.3] --out models/soup

Each input is anything `embtrain eval` loads (a run's `best` or `step_N`, an embtrain model
folder). A LoRA checkpoint is merged into its base first, so the soup averages the models'
effective weights (averaging the adapter matrices A and B separately would not). Every floating
tensor of the encoder (backbone, and a latent-attention pooler where there is one) is averaged
with the weights, normalised to sum to 1 (accumulated in float32, one model in memory at a time
besides the sum); integer buffers must be equal. The inputs must share
architecture, tensor names and shapes and the settings that change an embedding (pooling,
normalisation, prompts); the result is an embtrain model folder, the first input's settings, that
`embtrain eval`, `embtrain export` and `model.name_or_path` take. `merge.json` in it lists the
inputs and weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from trainer.errors import RunError

EMBEDDING_SETTINGS = ("pooling", "normalize", "query_prompt", "document_prompt", "pool_prompt", "embedding_dim", "bidirectional")
"""Settings that must agree among the inputs: averaging models that embed differently makes no sense."""
MANIFEST = "merge.json"


class MergeError(RunError):
    pass


def normalised_weights(count: int, weights: list[float] | None) -> list[float]:
    """Uniform weights, or the given ones scaled to sum to 1 (each must be >= 0, one > 0)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"--weights: {len(weights)} weights for {count} models; give one per model")
    if any(w < 0 or w != w for w in weights) or sum(weights) <= 0:
        raise MergeError(f"--weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


class RunningAverage:
    """The weighted sum of state dicts added one at a time, so that only one model besides the
    sum is in memory. Floating tensors accumulate in float32 (float64 when they are) and are
    stored back in their own dtype; other tensors must be equal in every state."""

    def __init__(self, state: dict[str, torch.Tensor], weight: float, name: str) -> None:
        self.first, self.name = state, name
        self.sums = {k: weight * _wide(t) for k, t in state.items() if t.is_floating_point()}

    def add(self, state: dict[str, torch.Tensor], weight: float, name: str) -> None:
        missing, extra = sorted(set(self.first) - set(state)), sorted(set(state) - set(self.first))
        if missing or extra:
            found = "; ".join(p for p in (f"missing {missing[:3]}" if missing else "", f"extra {extra[:3]}" if extra else "") if p)
            raise MergeError(f"{name} does not have the tensors of {self.name}: {found} (different architectures cannot be merged)")
        for key, tensor in self.first.items():
            if state[key].shape != tensor.shape:
                raise MergeError(f"{name}: {key} has shape {tuple(state[key].shape)}, {self.name} {tuple(tensor.shape)}")
            if key in self.sums:
                self.sums[key].add_(_wide(state[key]), alpha=weight)
            elif not torch.equal(state[key], tensor):
                raise MergeError(f"{name}: {key} differs from {self.name}'s and cannot be averaged (not a float tensor)")

    def result(self) -> dict[str, torch.Tensor]:
        return {k: self.sums[k].to(t.dtype) if k in self.sums else t for k, t in self.first.items()}


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def check_settings(configs, names: list[str]) -> None:
    first = configs[0]
    for config, name in zip(configs[1:], names[1:]):
        differ = [f"{s} {getattr(config, s)!r} vs {getattr(first, s)!r}" for s in EMBEDDING_SETTINGS if getattr(config, s) != getattr(first, s)]
        if differ:
            raise MergeError(f"{name} embeds differently from {names[0]}: " + "; ".join(differ))


def check_out(out: Path, inputs: list[str], overwrite: bool) -> Path:
    target = out.resolve()
    for source in inputs:
        protected = Path(source).resolve()
        if target == protected or target in protected.parents or protected in target.parents:
            raise MergeError(f"--out {out}: it overlaps the input {source}; choose a folder outside the inputs")
    if target.exists() and not target.is_dir():
        raise MergeError(f"--out {out}: a file of that name exists; choose a folder name")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise MergeError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return target


def merge(inputs: list[str], out: str | Path, weights: list[float] | None = None, overwrite: bool = False,
          trust_remote_code: bool = False) -> Path:
    """Write the weighted average of the models `inputs` to the folder `out`; returns its path."""
    from trainer.model.encoder import Encoder, embedding_config

    if len(inputs) < 2:
        raise MergeError("give at least two models to merge")
    weights = normalised_weights(len(inputs), weights)
    target = check_out(Path(out), inputs, overwrite)
    configs = [embedding_config(name, trust_remote_code) for name in inputs]
    check_settings(configs, inputs)
    first = Encoder.from_config(configs[0])
    average = RunningAverage(first.state_dict(), weights[0], inputs[0])
    for config, weight, name in zip(configs[1:], weights[1:], inputs[1:]):
        average.add(Encoder.from_config(config).state_dict(), weight, name)  # one model at a time
    first.load_state_dict(average.result())
    tmp = target.with_name(f".{target.name}.merging")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    first.save_pretrained(tmp)
    manifest = {"tool": "embtrain merge", "inputs": [str(i) for i in inputs], "weights": weights}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
