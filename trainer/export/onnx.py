"""ONNX export of the backbone for CPU inference (optional extra: pip install 'embtrain[onnx]').

Writes `onnx/model.onnx` inside the exported folder, the layout sentence-transformers' ONNX
backend loads (`SentenceTransformer(DIR, backend="onnx")`, which needs `optimum`): inputs are
the tokenizer's (input ids, attention mask, token types), the output is `last_hidden_state`;
pooling and normalisation stay in the folder's modules.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from trainer.errors import RunError
from trainer.model.encoder import Encoder
from trainer.model.pooling import POOLING

ONNX_FILE = Path("onnx") / "model.onnx"
ONNX_TOLERANCE = 1e-4
"""Largest allowed |difference| between ONNX Runtime and PyTorch embeddings (unit-norm, fp32)."""


class _Backbone(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.backbone(**dict(zip(self.names, inputs))).last_hidden_state


def write_onnx(encoder: Encoder, folder: Path) -> Path:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401  (the parity check runs the graph)
    except ImportError:
        raise RunError("--onnx needs the onnx extra: pip install 'embtrain[onnx]'") from None
    path = folder / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = encoder.tokenize(["an example sentence", "a second, longer example sentence for shapes"])
    names = [n for n in encoder.tokenizer.model_input_names if n in sample]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    module = _Backbone(encoder.backbone.float().eval(), names)
    # the tracing exporter warns about Python-level branches of the attention code; parity is
    # checked on texts of other lengths right after export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(sample[n] for n in names),
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def onnx_embeddings(
    folder: Path, encoder: Encoder, texts: list[str], prompt: str, truncate_dim: int | None
) -> torch.Tensor:
    """Embeddings from ONNX Runtime's backbone plus the same pooling and normalisation."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    features = encoder.tokenize([prompt + t for t in texts])
    feeds = {k: v.numpy().astype(np.int64) for k, v in features.items() if k in wanted}
    hidden = torch.from_numpy(session.run(["last_hidden_state"], feeds)[0])
    embeddings = POOLING[encoder.config.pooling](hidden, features["attention_mask"])
    if truncate_dim is not None:
        embeddings = embeddings[:, :truncate_dim]
    if encoder.config.normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    return embeddings
