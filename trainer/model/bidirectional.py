"""Bidirectional attention for decoder backbones (NV-Embed, LLM2Vec): every token attends to every
real token of its text, later ones included.

Done without touching the model's code, so that it survives transformers releases: every
attention module's `is_causal` flag is turned off (the flag sdpa and flash-attention kernels
read), and the model's forward is wrapped to turn the 2D padding mask into a 4D mask that lets each token see
all real tokens (transformers passes a ready 4D mask through unchanged instead of building its
causal one). `tests/trainer/model/test_bidirectional.py` checks against the installed version
that a later token really changes an earlier token's state.

This file imports only torch (and sentence-transformers for `BidirectionalTransformer`): `embtrain
export` copies it into the exported folder, so that sentence-transformers runs the model the same
way (`SentenceTransformer(DIR, trust_remote_code=True)`).
"""

from __future__ import annotations

import torch

ST_TYPE = "bidirectional.BidirectionalTransformer"
"""Its type in an exported folder's modules.json: this file, copied there, and its class."""


def make_bidirectional(model: torch.nn.Module) -> int:
    """Switch a Hugging Face decoder to bidirectional attention in place; the number of attention
    modules switched (0: nothing was causal, e.g. a BERT)."""
    switched = 0
    for module in model.modules():
        if getattr(module, "is_causal", None) is True:
            module.is_causal = False
            switched += 1
    if switched and not getattr(model, "_bidirectional", False):
        # wraps the instance's forward (not a pre-hook: sentence-transformers calls `model.forward` directly)
        causal_forward = model.forward

        def forward(*args, **kwargs):
            args, kwargs = _full_attention_mask(model, args, kwargs)
            return causal_forward(*args, **kwargs)

        model.forward = forward
        model._bidirectional = True
    return switched


def _full_attention_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The padding mask (B, L) as a 4D mask (B, 1, L, L) in which every token sees every real token."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        return args, kwargs
    reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if reference is None and args:
        reference = args[0]
    if mask is None:
        mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    keys = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)  # (B, 1, L, L)
    if getattr(module.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
        dtype = next(module.parameters()).dtype
        full = torch.zeros(keys.shape, dtype=dtype, device=mask.device).masked_fill(~keys, torch.finfo(dtype).min)
    else:
        full = keys
    return args, {**kwargs, "attention_mask": full}


try:  # the sentence-transformers module of an exported folder
    from sentence_transformers.base.modules import Transformer
except ImportError:  # pragma: no cover - sentence-transformers before 6
    try:
        from sentence_transformers.models import Transformer
    except ImportError:
        Transformer = None

if Transformer is not None:

    class BidirectionalTransformer(Transformer):
        """sentence-transformers' Transformer module with its model switched to bidirectional attention."""

        @classmethod
        def load(cls, *args, **kwargs):
            module = super().load(*args, **kwargs)
            make_bidirectional(module.auto_model)
            return module
