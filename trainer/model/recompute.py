"""Activation outputs recomputed in the backward pass instead of kept.

In a transformer's feed-forward block, the activation function's output (GELU, SiLU, ...) is
kept for the backward pass by the matrix product that reads it, while the activation keeps its
own input for its gradient: two of the widest tensors of a layer (the intermediate size, 4x
the hidden size in BERT), kept for every token. The output is an elementwise function of that
input, so `ActivationRecompute` keeps a way to make it again instead of the tensor itself (a
saved-tensor hook) and recomputes it when the backward pass reads it: the same bits, the same
gradients, for one elementwise function more per layer in the backward pass.

Only activations that are modules (`transformers.activations` and torch's own), without
parameters or buffers, whose output has its input's shape, dtype and layout, are recomputed;
anything else is kept as usual. An input changed in place before the backward pass is an error,
as autograd's own check would make it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

TORCH_ACTIVATIONS = (
    torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish, torch.nn.LeakyReLU,
    torch.nn.ELU, torch.nn.Softplus, torch.nn.Hardswish,
)


def is_pure_activation(module: torch.nn.Module) -> bool:
    """An activation function held as a module, with nothing learned or stored in it."""
    known = isinstance(module, TORCH_ACTIVATIONS) or type(module).__module__ == "transformers.activations"
    return known and next(module.parameters(), None) is None and next(module.buffers(), None) is None


@dataclass
class _Output:
    """An activation's output as the forward pass made it, and how to make it again."""

    output: weakref.ref
    input: torch.Tensor
    module: torch.nn.Module


@dataclass
class _Recipe:
    """What is saved instead of (a view of) an activation's output."""

    input: torch.Tensor
    module: torch.nn.Module
    version: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class ActivationRecompute:
    """Hooks on the activation modules of `backbone`; `with recompute.training():` around a
    forward pass with gradients makes that pass keep recipes instead of activation outputs."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self._outputs: dict[int, _Output] = {}  # by storage (its address in memory), while a forward pass runs
        self._active = False
        self.modules = [m for m in backbone.modules() if is_pure_activation(m)]
        self._handles = [module.register_forward_hook(self._record) for module in self.modules]

    def remove(self) -> None:
        """Take the hooks off the modules."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.modules = [], []

    def _record(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if not self._active or not args:
            return
        x = args[0]
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        same_layout = output.shape == x.shape and output.dtype == x.dtype and output.is_contiguous() and x.is_contiguous()
        if same_layout and output.numel() and output.storage_offset() == 0:
            self._outputs[output.untyped_storage()._cdata] = _Output(weakref.ref(output), x, module)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Recipe:
        if not tensor.numel():
            return tensor
        made = self._outputs.get(tensor.untyped_storage()._cdata)
        output = None if made is None else made.output()
        if output is None or output.dtype != tensor.dtype:  # not an activation's output (alive)
            return tensor
        return _Recipe(made.input, made.module, made.input._version, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def _unpack(saved: torch.Tensor | _Recipe) -> torch.Tensor:
        if not isinstance(saved, _Recipe):
            return saved
        if saved.input._version != saved.version:
            raise RuntimeError(
                "an activation's input was modified in place after the forward pass; "
                "set model.recompute_activations: false for this model"
            )
        with torch.no_grad(), torch.autocast(saved.input.device.type, enabled=False):
            again = saved.module(saved.input)
        return again.as_strided(saved.size, saved.stride, saved.offset)

    @contextmanager
    def training(self) -> Iterator[None]:
        if self._active or not torch.is_grad_enabled() or not self.modules:
            yield
            return
        with self.recording(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Note the activation outputs of the forward passes inside, for `keeps` (the memory
        estimate counts what is kept, under hooks of its own)."""
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._outputs.clear()

    def keeps(self, tensor: torch.Tensor) -> bool:
        """Whether a tensor autograd saves is kept as it is (not made again from an input)."""
        return not isinstance(self._pack(tensor), _Recipe)
