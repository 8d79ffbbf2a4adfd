"""The encoder: a Hugging Face backbone, pooling and optional L2 normalisation.

This is the only place where texts become embeddings, for training and evaluation alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from trainer.config import ModelConfig, RecipeError
from trainer.data.collate import PROMPT_LENGTH, prompt_token_count, tokenize
from trainer.errors import RunError
from trainer.model.packing import CHECK_TEXTS, PackingSupport, backbone_inputs, is_packed, packing_support, unpack
from trainer.model.pooling import POOLING
from trainer.model.recompute import ActivationRecompute
from trainer.model.sub_batches import trim
from trainer.progress import progress_bar
from trainer.schema import Builder

ENCODER_FILE = "embtrain_encoder.json"
"""Pooling, normalisation, length and prompts, saved next to the backbone."""


NOT_SAVED = ("name_or_path", "trust_remote_code")
"""Settings not saved with a model: where it was loaded from, and the permission to run code that
a model folder names, which only the user gives (model.trust_remote_code or --trust-remote-code)."""

POSITION_OFFSET_MODEL_TYPES = frozenset(
    {
        "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text",
        "longformer", "ibert", "mpnet", "xmod", "luke", "markuplm", "esm",
    }
)
"""Model types whose position ids start after the padding id, so that they take
`max_position_embeddings - (pad_token_id + 1)` tokens (512 of RoBERTa's 514)."""

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
)
"""A local model folder holds at least one of these when it has a tokenizer."""

LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
"""What transformers, torch and safetensors raise for a missing, corrupt or unsupported model."""


class ModelError(RunError):
    """A model cannot be found or loaded as asked; the message names it, the file and the reason."""


class SequenceLengthError(ModelError):
    """max_seq_length is more than the model's position embeddings take."""


def resolve_model_path(name_or_path: str) -> str:
    """Where to load a model from: `package:NAME` becomes the model folder shipped inside the
    installed package NAME, a checkpoint `step_N/` folder its `model/` subfolder; anything else
    (a model folder, a Hub id) is kept as it is."""
    path = name_or_path
    if name_or_path.startswith("package:"):
        package = name_or_path.removeprefix("package:")
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ModelError(
                f"model {name_or_path!r}: Python package {package!r} is not installed "
                f"(pip install {package.replace('_', '-')})"
            ) from None
        if hasattr(module, "get_model_path"):
            path = str(module.get_model_path())
        else:
            path = str(Path(module.__file__).parent / "model")
    if not Path(path).is_dir():
        return path
    from trainer.checkpoint import model_dir  # imported here: trainer.checkpoint imports this module

    return str(model_dir(path))


def _is_hub_id(name: str) -> bool:
    """`name` or `owner/name` as the Hub spells them; anything else can only be a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def locate_model(name_or_path: str) -> str:
    """The model folder or Hub id to load `name_or_path` from. A local name must be a folder with a
    config.json; a name that can only be a path and does not exist is reported as not found."""
    path = resolve_model_path(name_or_path)
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise ModelError(
                f"model {name_or_path!r}: {folder} is a file; give a model folder, a checkpoint step_N folder or a Hub id"
            )
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            held = sorted(p.name for p in folder.iterdir())
            contents = f"it holds {', '.join(held[:6])}{', ...' if len(held) > 6 else ''}" if held else "it is empty"
            raise ModelError(f"model {name_or_path!r}: {folder} is not a model folder: no config.json ({contents})")
        return path
    if not _is_hub_id(path):
        raise ModelError(f"model {name_or_path!r}: {path} not found")
    return path


def load_error(name: str, path: str, part: str, exc: BaseException) -> ModelError:
    """One line for what transformers raised while loading `part` (config, tokenizer, weights)."""
    text = " ".join(str(exc).split())
    if "trust_remote_code" in text:
        return ModelError(
            f"model {name!r}: {path} asks to run its own Python code to load its {part}; refused. Only if you "
            "trust it, set model.trust_remote_code: true in the recipe, or pass --trust-remote-code"
        )
    if isinstance(exc, OSError) and not Path(path).exists():
        return ModelError(
            f"model {name!r}: not found: there is no folder {Path(path).resolve()}, and the Hugging Face Hub "
            f"did not give it ({text[:300]})"
        )
    return ModelError(f"model {name!r}: cannot load the {part} from {path}: {type(exc).__name__}: {text[:500]}")


def position_limit(backbone_config) -> int | None:
    """The most tokens the backbone's table of absolute position embeddings takes; None for
    models without one (rotary, ALiBi or relative positions), whose limit is not a hard one."""
    positions = getattr(backbone_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions < 1:
        return None
    if getattr(backbone_config, "position_embedding_type", "absolute") != "absolute":
        return None
    if any("rope" in key or "rotary" in key for key in backbone_config.to_dict()):
        return None
    if backbone_config.model_type in POSITION_OFFSET_MODEL_TYPES:
        positions -= (getattr(backbone_config, "pad_token_id", None) or 0) + 1
    return positions


def read_backbone_config(config: ModelConfig):
    """(path to load from, the backbone's Hugging Face config), from config.json alone: a missing
    or corrupt model, or one whose code needs trust_remote_code, stops here before any weights load."""
    from transformers import AutoConfig

    path = locate_model(config.name_or_path)
    source = path
    if not (Path(path) / "config.json").is_file() and Path(path).is_dir():  # an exported adapter: its base's config
        from trainer.model.lora import adapter_base

        source = resolve_model_path(adapter_base(path, {})["name_or_path"])
    try:
        return path, AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except LOAD_ERRORS as exc:
        raise load_error(config.name_or_path, source, "config", exc) from None


def check_max_seq_length(config: ModelConfig, backbone_config) -> None:
    """max_seq_length must fit the backbone's position embeddings, or training fails mid-run on
    the first long text."""
    limit = position_limit(backbone_config)
    if limit is None or config.max_seq_length <= limit:
        return
    positions = backbone_config.max_position_embeddings
    offset = f" less {positions - limit} for {backbone_config.model_type}'s position offset" if positions != limit else ""
    raise SequenceLengthError(
        f"max_seq_length {config.max_seq_length} is more than model {config.name_or_path!r} takes: {limit} tokens "
        f"(max_position_embeddings {positions}{offset}, in its config.json); set max_seq_length to {limit} or less"
    )


def load_backbone_config(config: ModelConfig):
    """`read_backbone_config`, then `check_max_seq_length`."""
    path, backbone_config = read_backbone_config(config)
    check_max_seq_length(config, backbone_config)
    return path, backbone_config


def embedding_config(name_or_path: str, trust_remote_code: bool = False) -> ModelConfig:
    """How tools (eval, mining, scoring) embed with a model: the settings saved with it or, for a
    plain Hugging Face model, the defaults with max_seq_length capped at what the model takes."""
    config = saved_model_config(name_or_path)
    if config is None:
        config = ModelConfig(name_or_path=name_or_path, trust_remote_code=trust_remote_code)
        _, backbone_config = read_backbone_config(config)
        limit = position_limit(backbone_config)
        if limit is not None:
            config.max_seq_length = min(config.max_seq_length, limit)
    config.trust_remote_code = trust_remote_code
    return config


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder, checkpoint, Hub id or package:NAME; a `ModelError` if it cannot load."""
    from transformers import AutoTokenizer

    path = locate_model(name_or_path)
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone, which maps every word to [UNK]
        raise ModelError(
            f"model {name_or_path!r}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise load_error(name_or_path, path, "tokenizer", exc) from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        print(
            f"warning: {path}: the tokenizer has no vocabulary beyond its {len(tokenizer)} special tokens; "
            "every word becomes an unknown token",
            file=sys.stderr,
        )
    return tokenizer


def end_with_eos(tokenizer, name: str) -> None:
    """Last-token pooling reads the final token's state: make it the end-of-sequence token, as
    decoder embedders are trained, when the tokenizer does not add one itself (Qwen2 and Llama
    tokenizers do not). The setting is saved with the tokenizer, so exported folders add it too."""
    eos = tokenizer.eos_token_id
    ends_with_eos = lambda: tokenizer("a")["input_ids"][-1:] == [eos]  # noqa: E731
    if eos is None or ends_with_eos():
        return
    if hasattr(tokenizer, "add_eos_token"):
        tokenizer.add_eos_token = True
    if not ends_with_eos():
        print(
            f"warning: {name}: the tokenizer cannot be made to end texts with its end-of-sequence token "
            f"{tokenizer.eos_token!r}; last-token pooling reads each text's own last token",
            file=sys.stderr,
        )


def _read_json(path: Path, name: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ModelError(f"model {name!r}: cannot read {path}: {exc}") from None


def saved_model_config(path: str) -> ModelConfig | None:
    """Settings stored with a model folder: embtrain's own, or a sentence-transformers folder's.
    Unreadable or invalid settings are a `ModelError` naming the file."""
    folder = Path(resolve_model_path(path))
    settings_file = folder / ENCODER_FILE
    if settings_file.exists():
        data = _read_json(settings_file, path)
        if not isinstance(data, dict):
            raise ModelError(f"{settings_file}: expected a JSON object of settings, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in NOT_SAVED and k != "adapter_base"}  # read by build_backbone
        try:
            return Builder(str(settings_file)).build(ModelConfig, {"name_or_path": path, **data}, "")
        except RecipeError as exc:
            raise ModelError(str(exc)) from None
    modules_file = folder / "modules.json"
    if modules_file.exists():
        modules = _read_json(modules_file, path)
        if not (isinstance(modules, list) and all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules)):
            raise ModelError(f"{modules_file}: expected a list of modules, each with a 'type'")
        kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
        config = ModelConfig(name_or_path=path, normalize="Normalize" in kinds, bidirectional="BidirectionalTransformer" in kinds)
        if "LatentAttentionPooling" in kinds:
            from trainer.config import LatentAttentionConfig

            options = _read_json(folder / str(kinds["LatentAttentionPooling"].get("path", "")) / "config.json", path)
            config.pooling = "latent_attention"
            config.latent_attention = LatentAttentionConfig(**{k: options[k] for k in ("num_latents", "num_heads", "mlp_dim") if k in options})
            config.pool_prompt = bool(options.get("include_prompt", True))
        if "Pooling" in kinds:
            pooling = _read_json(folder / str(kinds["Pooling"].get("path", "")) / "config.json", path)
            if not isinstance(pooling, dict):
                raise ModelError(f"{folder / str(kinds['Pooling'].get('path', ''))}/config.json: expected a JSON object")
            if pooling.get("pooling_mode_cls_token"):
                config.pooling = "cls"
            elif pooling.get("pooling_mode_lasttoken"):
                config.pooling = "last_token"
            config.pool_prompt = bool(pooling.get("include_prompt", True))
        if "Dense" in kinds:
            config.embedding_dim = truncation_dim(folder / str(kinds["Dense"].get("path", "")), path)
        bert_config = folder / "sentence_bert_config.json"
        if bert_config.exists():
            length = _read_json(bert_config, path).get("max_seq_length", config.max_seq_length)
            if not isinstance(length, int) or isinstance(length, bool) or length < 1:
                raise ModelError(f"{bert_config}: max_seq_length must be a whole number >= 1, got {length!r}")
            config.max_seq_length = length
        st_config = folder / "config_sentence_transformers.json"
        if st_config.exists():
            prompts = _read_json(st_config, path).get("prompts") or {}
            config.query_prompt = str(prompts.get("query", ""))
            config.document_prompt = str(prompts.get("document", prompts.get("passage", "")))
        return config
    return None


def truncation_dim(dense: Path, name: str) -> int:
    """The N of a Dense module that keeps the first N dimensions (what `embtrain export --dim N`
    writes); a `ModelError` for any other Dense module, which embtrain does not load."""
    from safetensors.torch import load_file

    settings = _read_json(dense / "config.json", name)
    weights = dense / "model.safetensors"
    problem = None
    if not isinstance(settings, dict) or settings.get("bias") or not str(settings.get("activation_function", "")).endswith("Identity"):
        problem = "has a bias or an activation"
    elif not weights.exists():
        problem = "has no model.safetensors"
    else:
        try:
            weight = load_file(str(weights)).get("linear.weight")
        except LOAD_ERRORS as exc:
            raise ModelError(f"model {name!r}: cannot read {weights}: {exc}") from None
        if weight is None or weight.ndim != 2 or not torch.equal(weight.float(), torch.eye(weight.shape[1])[: weight.shape[0]]):
            problem = "is a learned projection"
    if problem:
        raise ModelError(
            f"model {name!r}: {dense} {problem}, not a cut to the first dimensions; embtrain loads only the "
            "Dense module that `embtrain export --dim` writes"
        )
    return int(weight.shape[0])


def attention_kernel(requested: str | None) -> str | None:
    """`model.attn_implementation`; None leaves the choice to transformers (sdpa where the model
    supports it). flash_attention_2 is never picked unasked: many encoders lack it, it takes no
    float32, and evaluation and export's parity check run the same settings on the CPU."""
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    return requested


UNFUSED_ATTENTION_WIDTH = 128
"""On a CPU in bf16, training forwards whose rows are at most this many tokens wide run
attention on PyTorch's unfused sdpa kernel: there the fused (flash) kernel's backward pass is
the slow part (MiniLM's heads, forward and backward together: 3.8x slower than the unfused
kernel at 32 tokens, 1.1x at 128; 2.1x faster at 256). In evaluation and mining (no backward
pass), and in float32, the fused kernel is faster at every width (README: Speed)."""


def attention_backend(width: int, device: torch.device, weights: torch.dtype, training: bool):
    """The sdpa kernel for a forward of rows `width` tokens wide: the unfused one for short rows
    of a training forward in bf16 on a CPU (`UNFUSED_ATTENTION_WIDTH`), PyTorch's own choice
    otherwise. `training`: the encoder trains, without gradient checkpointing (whose layers run
    again in the backward pass, outside this context, and must save what the forward saved);
    both passes of the cached loss are training forwards, so they embed alike."""
    if device.type != "cpu" or width > UNFUSED_ATTENTION_WIDTH or not training:
        return nullcontext()
    try:
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    except TypeError:  # torch < 2.4
        autocast = torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if torch.bfloat16 not in (weights, autocast):
        return nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


DROPOUT_FIELDS = {
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "attention_dropout_prob"),
    "hidden_dropout": ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "dropout"),
}
"""Where model configs keep each dropout (`model.attention_dropout`, `model.hidden_dropout`)."""


OWN_DROPOUTS = "embtrain_own_dropouts"
"""Attribute of a loaded backbone: the model's own values of the config fields the recipe's
dropouts changed, written back into config.json when it is saved (`own_dropouts`)."""


def dropout_settings(path: str, config: ModelConfig, backbone_config=None) -> tuple[dict[str, float], dict[str, float]]:
    """The backbone config fields the recipe's dropouts set, e.g. {'attention_probs_dropout_prob': 0.0},
    and the model's own values of those fields ({'attention_probs_dropout_prob': 0.1}), read from
    `backbone_config` or else `path`'s config.json. A dropout of 0 for a model that has no such
    field leaves the model as it is; any other value is an error."""
    wanted = {key: getattr(config, key) for key in DROPOUT_FIELDS if getattr(config, key) is not None}
    if not wanted:
        return {}, {}
    if backbone_config is None:
        from transformers import AutoConfig

        backbone_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    settings, own = {}, {}
    for key, value in wanted.items():
        names = [name for name in DROPOUT_FIELDS[key] if isinstance(getattr(backbone_config, name, None), (int, float))]
        if not names and value == 0:
            continue  # nothing to switch off
        if not names:
            raise ModelError(
                f"model.{key}: {config.name_or_path} ({backbone_config.model_type}) has no such dropout "
                f"(its config has none of {', '.join(DROPOUT_FIELDS[key])}); set it to 0 or null"
            )
        settings[names[0]] = value
        own[names[0]] = getattr(backbone_config, names[0])
    return settings, own


@contextmanager
def own_dropouts(backbone: torch.nn.Module):
    """The model's own dropouts in the backbone's config while it is saved: the recipe's
    dropouts are a training setting, not part of the model, so a checkpoint or an exported
    folder trained with `attention_dropout: 0` still says 0.1 for BERT."""
    from trainer.model.lora import is_lora

    base = backbone.get_base_model() if is_lora(backbone) else backbone
    own = getattr(base, OWN_DROPOUTS, {})
    live = {name: getattr(base.config, name) for name in own}
    for name, value in own.items():
        setattr(base.config, name, value)
    try:
        yield
    finally:
        for name, value in live.items():
            setattr(base.config, name, value)


def _load_backbone(path: str, config: ModelConfig) -> torch.nn.Module:
    """The backbone without its pooler head (unused by every pooling here), in the recipe's
    precision and attention kernel. transformers' own load report is silenced, since it flags
    the pooler weights left out; weights that really are missing or unused are reported in one
    line instead."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    import transformers
    from packaging.version import Version

    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"  # renamed in 4.56
    options = {"output_loading_info": True, "trust_remote_code": config.trust_remote_code, dtype_key: config.torch_dtype}
    kernel = attention_kernel(config.attn_implementation)
    if kernel is not None:
        options["attn_implementation"] = kernel
    dropouts, own = dropout_settings(path, config)
    options.update(dropouts)  # config fields, checked to exist above
    try:
        try:
            backbone, info = AutoModel.from_pretrained(path, add_pooling_layer=False, **options)
        except TypeError:  # models without a pooler option
            backbone, info = AutoModel.from_pretrained(path, **options)
    finally:
        hf_logging.set_verbosity(verbosity)
    setattr(backbone, OWN_DROPOUTS, own)
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


def build_backbone(config: ModelConfig, merge_adapter: bool = True) -> torch.nn.Module:
    """The backbone `config` names, cut to its `layers` / `num_layers`. A folder holding a LoRA
    adapter is its base model (built the same way, so a base that is itself an adapter folder
    works too), cut as it was in training, with the adapter applied."""
    from trainer.model.lora import adapter_base, holds_adapter, load_adapter

    path = locate_model(config.name_or_path)
    if holds_adapter(path):
        settings_file = Path(path) / ENCODER_FILE
        settings = _read_json(settings_file, config.name_or_path) if settings_file.exists() else {}
        base = adapter_base(path, settings if isinstance(settings, dict) else {})
        base_config = ModelConfig(
            name_or_path=base["name_or_path"], layers=base.get("layers"), num_layers=base.get("num_layers"),
            trust_remote_code=config.trust_remote_code, torch_dtype=config.torch_dtype,
            attn_implementation=config.attn_implementation, bidirectional=config.bidirectional,
            attention_dropout=config.attention_dropout, hidden_dropout=config.hidden_dropout,
        )
        try:
            backbone = load_adapter(build_backbone(base_config), path, merge_adapter)
        except LOAD_ERRORS as exc:
            raise load_error(config.name_or_path, path, "LoRA adapter", exc) from None
    else:
        try:
            backbone = _load_backbone(path, config)
        except LOAD_ERRORS as exc:
            raise load_error(config.name_or_path, path, "weights", exc) from None
    if config.layers is not None:
        keep_layers(backbone, config.layers, config.name_or_path)
    if config.num_layers is not None:
        keep_first_layers(backbone, config.num_layers, config.name_or_path)
    return backbone


def keep_first_layers(backbone: torch.nn.Module, count: int, name: str) -> None:
    """Cut the backbone to its first `count` transformer layers, in place (see `keep_layers`)."""
    total = getattr(backbone.config, "num_hidden_layers", None)
    if isinstance(total, int) and not 1 <= count <= total:
        raise ModelError(f"model.num_layers {count}: {name} has {total} layers; keep between 1 and {total}")
    keep_layers(backbone, list(range(count)), name, "model.num_layers")


def keep_layers(backbone: torch.nn.Module, indices: list[int], name: str, option: str = "model.layers") -> None:
    """Keep only the transformer layers at `indices` (0-based, increasing), in place; its config
    says so too, so that a saved copy is a smaller model of the same architecture."""
    total = getattr(backbone.config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ModelError(f"{option}: {name}'s config gives no num_hidden_layers, so its layers cannot be cut")
    outside = [i for i in indices if not 0 <= i < total]
    if outside:
        raise ModelError(f"{option}: {name} has {total} layers (0 to {total - 1}); there is no layer {outside[0]}")
    if list(indices) == list(range(total)):
        return
    stacks = [n for n, m in backbone.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total]
    if len(stacks) != 1:
        raise ModelError(
            f"{option}: cannot tell which module list of {type(backbone).__name__} holds its {total} layers "
            f"(found {len(stacks)}: {', '.join(stacks) or 'none'})"
        )
    parent_name, _, attribute = stacks[0].rpartition(".")
    parent = backbone.get_submodule(parent_name)
    layers = list(getattr(parent, attribute))
    setattr(parent, attribute, torch.nn.ModuleList([layers[i] for i in indices]))
    for position, layer in enumerate(getattr(parent, attribute)):  # decoders number their layers (KV cache)
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    backbone.config.num_hidden_layers = len(indices)
    layer_types = getattr(backbone.config, "layer_types", None)  # per-layer attention kinds (Qwen2, Gemma)
    if isinstance(layer_types, list) and len(layer_types) == total:
        backbone.config.layer_types = [layer_types[i] for i in indices]


def enable_gradient_checkpointing(backbone: torch.nn.Module) -> None:
    """Non-reentrant checkpointing (works with GradCache's replays); the name changed in transformers 5."""
    options = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def latent_attention_weights(folder: Path) -> Path | None:
    """Where a model folder keeps latent-attention weights: embtrain's file, or the module's
    folder in an exported sentence-transformers folder; None when it has none."""
    from trainer.model.latent_attention import ST_TYPE, WEIGHTS_FILE

    if (folder / WEIGHTS_FILE).is_file():
        return folder / WEIGHTS_FILE
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        for module in _read_json(modules_file, str(folder)):
            if isinstance(module, dict) and module.get("type") == ST_TYPE:
                return folder / str(module.get("path", "")) / "model.safetensors"
    return None


def without_prompt(mask: torch.Tensor, prompt_length: torch.Tensor) -> torch.Tensor:
    """The attention mask (B, L) with each row's first `prompt_length` real tokens zeroed, for
    pooling only (under left padding the real tokens start after the padding)."""
    first = mask.long().argmax(dim=1)  # (B,) position of the first real token
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask * (positions >= (first + prompt_length.to(mask.device)).unsqueeze(1)).to(mask.dtype)


class Encoder(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, tokenizer, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.recompute = ActivationRecompute(backbone) if config.recompute_activations else None
        self.packing: PackingSupport | None = None
        """How the backbone runs packed chunks (`find_packing`); None: it is given none."""
        self.packing_refused = ""
        """Why `find_packing` found no way to pack, when it did not."""
        if config.pooling == "latent_attention":  # a trained module (its weights: `load_pooling_weights`)
            from trainer.model.latent_attention import LatentAttention

            options = config.latent_attention
            self.pool = LatentAttention(backbone.config.hidden_size, options.num_latents, options.num_heads, options.mlp_dim)
        else:
            self.pool = POOLING[config.pooling]

    @classmethod
    def from_config(cls, config: ModelConfig, merge_adapter: bool = True) -> "Encoder":
        """Load the backbone and tokenizer; any problem is a `ModelError` that names the model and
        the reason (see `load_backbone_config`, which runs first). A folder that holds a LoRA
        adapter loads merged into its base, unless `merge_adapter` is False (export's reference);
        `config.lora` then adds fresh adapters to train."""
        load_backbone_config(config)
        tokenizer = load_tokenizer(config.name_or_path, config.trust_remote_code)
        backbone = build_backbone(config, merge_adapter)
        if tokenizer.pad_token is None:  # decoder LLMs often have none
            tokenizer.pad_token = tokenizer.eos_token
        if config.pooling == "last_token":
            end_with_eos(tokenizer, config.name_or_path)
        if config.bidirectional:
            from trainer.model.bidirectional import make_bidirectional

            if not make_bidirectional(backbone):
                raise ModelError(f"model.bidirectional: {config.name_or_path} has no causal attention to switch off")
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        if config.lora is not None:
            from trainer.model.lora import add_lora

            backbone = add_lora(backbone, config.lora, config.gradient_checkpointing)
        hidden = getattr(backbone.config, "hidden_size", None)
        if config.embedding_dim is not None and hidden is not None and config.embedding_dim > hidden:
            raise ModelError(f"model.embedding_dim {config.embedding_dim} is more than {config.name_or_path}'s {hidden} dimensions")
        if config.pooling == "latent_attention" and hidden % config.latent_attention.num_heads:
            raise ModelError(f"model.latent_attention.num_heads {config.latent_attention.num_heads} must divide {config.name_or_path}'s hidden size {hidden}")
        encoder = cls(backbone, tokenizer, config)
        if config.pooling == "latent_attention":
            encoder.load_pooling_weights(locate_model(config.name_or_path))
        return encoder

    def load_pooling_weights(self, folder: str) -> None:
        """The trained latent-attention weights a model folder holds (embtrain's or an exported
        one); a model without them starts the module at random (seeded by the recipe)."""
        from safetensors.torch import load_file

        path = latent_attention_weights(Path(folder))
        if path is None:
            return
        try:
            weights = {k.removeprefix("pool."): v for k, v in load_file(str(path)).items()}  # exported: the ST module's keys
            self.pool.load_state_dict(weights)
        except LOAD_ERRORS as exc:
            raise ModelError(f"model {self.config.name_or_path!r}: cannot load the latent-attention weights {path}: {exc}") from None

    def find_packing(self) -> PackingSupport | None:
        """Whether, and how, the backbone runs packed chunks (`packing.packing_support`: forwards
        of three short texts); sets `self.packing`, and `self.packing_refused` to why not."""

        def embed(features: dict[str, torch.Tensor], support: PackingSupport | None) -> torch.Tensor:
            self.packing = support
            return self(features)

        self.packing, self.packing_refused = packing_support(
            embed, self.tokenize(CHECK_TEXTS), self.backbone, self.config.max_seq_length
        )
        return self.packing

    @property
    def dim(self) -> int:
        """The size of the embeddings it returns (model.embedding_dim when set)."""
        return self.config.embedding_dim or self.backbone.config.hidden_size

    @property
    def num_layers(self) -> int | None:
        """Transformer layers of the backbone, when its config says."""
        layers = getattr(self.backbone.config, "num_hidden_layers", None)
        return layers if isinstance(layers, int) else None

    def forward(self, features: dict[str, torch.Tensor], layers: tuple[int, ...] = ()) -> torch.Tensor:
        """Tokenised texts to embeddings (B, D). With `layers`, (B, 1+K, D): the final embeddings,
        then those pooled the same way from the output of each of the first `layers[k]` transformer
        layers (0: the token embeddings), for 2D Matryoshka losses."""
        prompt_length = features.get(PROMPT_LENGTH)
        packed = is_packed(features)
        weights = next(self.backbone.parameters()).dtype
        if packed:  # several texts per row (`packing`): each text's states are gathered back below
            if self.packing is None:
                raise RuntimeError("a packed chunk reached an encoder whose packing support was not found (find_packing)")
            inputs = backbone_inputs(features, self.packing, weights)
        else:
            inputs = {k: v for k, v in features.items() if k != PROMPT_LENGTH}
        rows = inputs["attention_mask"]  # (B, L), or packed: (R, 1, W, W)
        training = self.training and not self.config.gradient_checkpointing
        kernel = attention_backend(rows.shape[-1], rows.device, weights, training)
        with kernel, nullcontext() if self.recompute is None else self.recompute.training():
            output = self.backbone(**inputs, **({"output_hidden_states": True} if layers else {}))
        mask = features["attention_mask"] if prompt_length is None else without_prompt(features["attention_mask"], prompt_length)
        hidden = unpack(output.last_hidden_state, features) if packed else output.last_hidden_state
        embeddings = self.pool(hidden, mask)  # (B, L, H) -> (B, H)
        if layers:
            earlier = [self._layer_output(output.hidden_states, k) for k in layers]
            earlier = [self.pool(unpack(h, features) if packed else h, mask) for h in earlier]
            embeddings = torch.stack([embeddings] + earlier, dim=1)
        if self.config.embedding_dim is not None:
            embeddings = embeddings[..., : self.config.embedding_dim]
        if self.config.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings

    def _layer_output(self, hidden_states: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
        """The token states after `layer` layers as the model cut to `layer` layers gives them:
        through the backbone's final norm when it has one (Llama, Qwen2), which transformers
        applies to the last entry of `hidden_states` only."""
        states = hidden_states[layer]
        final_norm = getattr(self.backbone, "norm", None)
        if layer < len(hidden_states) - 1 and isinstance(final_norm, torch.nn.Module):
            states = final_norm(states)
        return states

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
        prompt: str | None = None,
    ) -> torch.Tensor:
        """Embeddings (N, H) in float32 on the CPU, with the query or document prompt added
        (`prompt` instead, when given: an evaluation set's own instruction).

        Texts are sorted by length so that batches carry little padding, and a batch is padded
        on the right up to its shape bucket (`sub_batches.bucket_length`), so that a corpus
        brings a few tensor shapes instead of one per batch: on a CPU, oneDNN compiles and keeps
        kernels per shape (the SciFact corpus: 0.2 GB less peak memory, the same speed in bf16,
        1.6% slower in float32). `module` is called instead of this encoder when given: FSDP1's
        wrapper, whose forward gathers the sharded parameters."""
        if prompt is None:
            prompt = self.config.query_prompt if is_query else self.config.document_prompt
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = torch.empty(len(texts), self.dim)
        starts = range(0, len(texts), batch_size)
        for start in progress_bar(starts, desc=progress, hide=progress is None, leave=False):
            index = order[start : start + batch_size]
            features = self.tokenize([prompt + texts[i] for i in index])
            if not self.config.pool_prompt:
                features[PROMPT_LENGTH] = torch.full((len(index),), prompt_token_count(self.tokenizer, prompt))
            features = {k: v.to(device) for k, v in trim(features, buckets=True).items()}
            out[index] = (self if module is None else module)(features).float().cpu()
        self.train(was_training)
        return out

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The backbone in Hugging Face format (safetensors), its tokenizer and our settings.

        `state_dict` is the encoder's full state when the parameters are sharded (ZeRO-3, FSDP)."""
        from trainer.model.lora import ADAPTER_BASE, is_lora, save_adapter

        folder = Path(folder)
        full_state = state_dict
        if state_dict is not None:
            state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        settings = {k: v for k, v in asdict(self.config).items() if k not in NOT_SAVED}
        settings.update(layers=None, num_layers=None)  # the saved backbone holds only the kept layers
        if is_lora(self.backbone):  # the adapter only, and where its base comes from
            with own_dropouts(self.backbone):
                save_adapter(self.backbone, folder, state_dict)
            name = self.config.name_or_path
            settings[ADAPTER_BASE] = {
                "name_or_path": str(Path(name).resolve()) if Path(name).exists() else name,
                "layers": self.config.layers,
                "num_layers": self.config.num_layers,
            }
            settings["lora"] = None  # loading the folder applies its adapter; it adds no new one
        else:
            with own_dropouts(self.backbone):
                self.backbone.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        if isinstance(self.pool, torch.nn.Module):  # latent attention: its trained weights
            from safetensors.torch import save_file

            from trainer.model.latent_attention import WEIGHTS_FILE

            weights = self.pool.state_dict() if full_state is None else {
                k.removeprefix("pool."): v for k, v in full_state.items() if k.startswith("pool.")
            }
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(folder)
        (folder / ENCODER_FILE).write_text(json.dumps(settings, indent=2))
