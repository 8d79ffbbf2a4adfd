"""Cached contrastive loss (GradCache): the loss of a huge batch in the memory of a small one.

1. Embed the batch in chunks without gradient, remembering each chunk's RNG state.
2. Compute the loss on the detached embeddings and its gradient with respect to them.
3. Embed each chunk again, with gradient and the same RNG state (so dropout masks are
   identical), and backpropagate the cached embedding gradient through it.

Parameter gradients equal those of the plain loss on the whole batch, while activation
memory is bounded by one chunk. It wraps any loss that takes embeddings.

Reference: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", RepL4NLP 2021.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

Features = dict[str, torch.Tensor]


class RngState:
    """The CPU and current-GPU random state, to replay dropout exactly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def embed_without_grad(
    encoder: torch.nn.Module, chunks: list[Features], device: torch.device
) -> tuple[torch.Tensor, list[RngState]]:
    states, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            outputs.append(encoder(chunk))
    return torch.cat(outputs), states
