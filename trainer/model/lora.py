"""LoRA adapters on the backbone, through peft.

A LoRA encoder's backbone is a `peft.PeftModel`; everything else (pooling, the step, the losses)
is unchanged. What differs is what gets saved:
- a model folder (`step_N/model`, `best/`) holds the adapter (`adapter_config.json`,
  `adapter_model.safetensors`), the backbone's config.json, the tokenizer and the encoder
  settings, which name the base model under `adapter_base`; loading the folder loads the base,
  cuts it as it was cut, and applies the adapter (merged, for evaluation and as a new run's start);
- the resume state (`step_N/accelerate/`) holds only the trainable parameters, not the frozen
  base weights again (`keep_trainable_in_checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from trainer.config import LoraConfig
from trainer.errors import RunError

ADAPTER_CONFIG = "adapter_config.json"
"""peft's file in a folder that holds an adapter."""
ADAPTER_BASE = "adapter_base"
"""The key of the encoder settings that names the base model of a saved adapter."""


def is_lora(backbone: torch.nn.Module) -> bool:
    return hasattr(backbone, "peft_config") and hasattr(backbone, "merge_and_unload")


def holds_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@contextlib.contextmanager
def _quiet():
    """peft reads an attribute that transformers 5 deprecates: a warning no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(backbone: torch.nn.Module, config: LoraConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """The backbone with fresh adapters (the update starts at zero, so the model is unchanged)."""
    import peft

    if gradient_checkpointing:  # the checkpointed blocks need an input that requires grad
        backbone.enable_input_require_grads()
    settings = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules or "all-linear",
        modules_to_save=config.trainable_modules or None,
        bias="none",
    )
    try:
        with _quiet():
            return peft.get_peft_model(backbone, settings)
    except ValueError as exc:  # peft: a target module that matches nothing, or an unsupported layer
        raise RunError(f"model.lora: {' '.join(str(exc).split())[:400]}") from None


def load_adapter(backbone: torch.nn.Module, folder: str | Path, merge: bool) -> torch.nn.Module:
    """`folder`'s adapter on `backbone`: merged into its weights (a plain model again), or kept."""
    import peft

    with _quiet():
        model = peft.PeftModel.from_pretrained(backbone, str(folder), is_trainable=False)
    if not merge:
        return model
    return model.merge_and_unload().requires_grad_(True)  # peft froze the base; a merged model trains in full


def merged(backbone: torch.nn.Module) -> torch.nn.Module:
    """A copy-free merge: the adapters folded into the base weights; a plain model is returned as is."""
    return backbone.merge_and_unload() if is_lora(backbone) else backbone


def save_adapter(
    backbone: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None, with_config: bool = True
) -> None:
    """The adapter (and trainable modules) of a LoRA backbone, plus the base's config.json when
    `with_config` (embtrain's folders; sentence-transformers reads a folder with a config.json as
    a full model, so an exported adapter has none)."""
    backbone.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card; export writes the real one
    if with_config:
        backbone.get_base_model().config.save_pretrained(folder)


def adapter_base(folder: str | Path, settings: dict) -> dict:
    """Which base model a saved adapter goes on, and how it was cut (`layers`, `num_layers`)."""
    base = settings.get(ADAPTER_BASE)
    if not isinstance(base, dict) or not isinstance(base.get("name_or_path"), str):
        adapter = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = {"name_or_path": adapter.get("base_model_name_or_path")}
        if not isinstance(base["name_or_path"], str):
            raise RunError(f"{folder}: holds an adapter, but neither its settings nor {ADAPTER_CONFIG} name the base model")
    return base


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:.2f}M" if number >= 1e6 else f"{number / 1e3:.1f}K"


def describe_parameters(module: torch.nn.Module, backbone: torch.nn.Module) -> str:
    """One line: trainable against total parameters and, for LoRA, where the adapters are."""
    trainable, total = parameter_counts(module)
    line = f"trainable parameters: {_count(trainable)} of {_count(total)} ({100 * trainable / max(total, 1):.2f}%)"
    if not is_lora(backbone):
        return line + ", full fine-tuning"
    settings = backbone.peft_config["default"]
    targets = sorted({name.rsplit(".", 1)[-1] for name in settings.target_modules})
    adapted = sum(1 for name, _ in backbone.named_modules() if name.endswith(".lora_A"))
    line += f", LoRA rank {settings.r} (alpha {settings.lora_alpha:g}) on {adapted} modules ({', '.join(targets)})"
    if settings.modules_to_save:
        line += f" + trained in full: {', '.join(sorted(settings.modules_to_save))}"
    return line


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def keep_trainable_in_checkpoints(accelerator, encoder: torch.nn.Module) -> None:
    """`save_state` writes only the trainable parameters of the (prepared) LoRA `encoder`: the frozen
    base weights are the same in every checkpoint and come from the base model on resume."""
    names = trainable_names(encoder)

    def hook(models: list, weights: list, output_dir: str) -> None:
        for model, state in zip(models, weights):
            if model is encoder:
                for key in [k for k in state if k not in names]:
                    del state[key]

    accelerator.register_save_state_pre_hook(hook)


def check_trainable_checkpoint(path: Path, encoder: torch.nn.Module) -> None:
    """A resume state must hold exactly the trainable parameters of this LoRA encoder: a checkpoint
    of another adapter shape (rank, targets) is refused instead of half loaded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        saved = set(handle.keys())
    wanted = trainable_names(encoder)
    if saved != wanted:
        missing, extra = sorted(wanted - saved), sorted(saved - wanted)
        raise RunError(
            f"{path}: the checkpoint's trainable weights do not match this recipe's LoRA adapters "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}); "
            "resume with the model.lora settings the run started with"
        )
