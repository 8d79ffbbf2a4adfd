"""The encoder: a Hugging Face backbone, pooling and optional L2 normalisation.

This is the only place where texts become embeddings, for training and evaluation alike.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.config import ModelConfig
from trainer.data.collate import tokenize
from trainer.model.pooling import POOLING

ENCODER_FILE = "embtrain_encoder.json"
"""Pooling, normalisation, length and prompts, saved next to the backbone."""


def resolve_model_path(name_or_path: str) -> str:
    """`package:NAME` becomes the model folder shipped inside the installed package NAME."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    package = name_or_path.removeprefix("package:")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(
            f"model {name_or_path!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        ) from None
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(Path(module.__file__).parent / "model")


def saved_model_config(path: str) -> ModelConfig | None:
    """Settings stored with a model folder: embtrain's own, or a sentence-transformers folder's."""
    folder = Path(resolve_model_path(path))
    if (folder / ENCODER_FILE).exists():
        data = json.loads((folder / ENCODER_FILE).read_text())
        return ModelConfig(name_or_path=path, **data)
    modules_file = folder / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
        config = ModelConfig(name_or_path=path, normalize="Normalize" in kinds)
        if "Pooling" in kinds:
            pooling = json.loads((folder / kinds["Pooling"]["path"] / "config.json").read_text())
            if pooling.get("pooling_mode_cls_token"):
                config.pooling = "cls"
            elif pooling.get("pooling_mode_lasttoken"):
                config.pooling = "last_token"
        bert_config = folder / "sentence_bert_config.json"
        if bert_config.exists():
            config.max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length", config.max_seq_length)
        st_config = folder / "config_sentence_transformers.json"
        if st_config.exists():
            prompts = json.loads(st_config.read_text()).get("prompts", {})
            config.query_prompt = prompts.get("query", "")
            config.document_prompt = prompts.get("document", prompts.get("passage", ""))
        return config
    return None


def _load_backbone(path: str) -> torch.nn.Module:
    """The backbone without its pooler head (unused by every pooling here). transformers' own
    load report is silenced, since it flags the pooler weights left out; weights that really are
    missing or unused are reported in one line instead."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            backbone, info = AutoModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True)
        except TypeError:  # models without a pooler option
            backbone, info = AutoModel.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or [])
    unused = [k for k in info.get("unexpected_keys") or [] if not k.startswith("pooler.")]
    if missing or unused:
        print(
            f"warning: {path}: {len(missing)} weights not in the checkpoint, initialised at random "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {len(unused)} checkpoint weights "
            f"unused ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})",
            file=sys.stderr,
        )
    return backbone


def enable_gradient_checkpointing(backbone: torch.nn.Module) -> None:
    """Non-reentrant checkpointing (works with GradCache's replays); the name changed in transformers 5."""
    options = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


class Encoder(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, tokenizer, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.pool = POOLING[config.pooling]

    @classmethod
    def from_config(cls, config: ModelConfig) -> "Encoder":
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(config.name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            backbone = _load_backbone(path)
        except OSError as exc:
            raise FileNotFoundError(f"model {config.name_or_path!r}: cannot load: {exc}") from None
        if tokenizer.pad_token is None:  # decoder LLMs often have none
            tokenizer.pad_token = tokenizer.eos_token
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        return cls(backbone, tokenizer, config)

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised texts to embeddings (B, H)."""
        hidden = self.backbone(**features).last_hidden_state  # (B, L, H)
        embeddings = self.pool(hidden, features["attention_mask"])
        if self.config.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.config.max_seq_length)

    @torch.no_grad()
    def encode(
        self,
        texts: list[str],
        *,
        is_query: bool,
        batch_size: int = 64,
        progress: str | None = None,
        module: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Embeddings (N, H) in float32 on the CPU, with the query or document prompt added.

        Texts are sorted by length so that batches carry little padding. `module` is called
        instead of this encoder when given: FSDP1's wrapper, whose forward gathers the sharded
        parameters."""
        prompt = self.config.query_prompt if is_query else self.config.document_prompt
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = torch.empty(len(texts), self.dim)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            index = order[start : start + batch_size]
            features = self.tokenize([prompt + texts[i] for i in index])
            features = {k: v.to(device) for k, v in features.items()}
            out[index] = (self if module is None else module)(features).float().cpu()
        self.train(was_training)
        return out

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The backbone in Hugging Face format (safetensors), its tokenizer and our settings.

        `state_dict` is the encoder's full state when the parameters are sharded (ZeRO-3, FSDP)."""
        folder = Path(folder)
        if state_dict is not None:
            state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        settings = asdict(self.config)
        settings.pop("name_or_path")
        (folder / ENCODER_FILE).write_text(json.dumps(settings, indent=2))
