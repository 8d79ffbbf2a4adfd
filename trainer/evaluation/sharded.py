"""Encoding for evaluation on every process: each process embeds its share of the texts, and all
of them receive every embedding.

Under ZeRO-3 and FSDP the parameters are sharded, so every process must take part in every
forward pass; the shares are therefore padded to the same length, which gives every process the
same number of batches.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import FullyShardedDataParallel

from trainer.model.encoder import Encoder

GATHER_ROWS = 16384
"""Rows per process in one gather, which bounds the device memory a gather takes."""


class TextEncoder(Protocol):
    """What the evaluators need: `Encoder.encode`'s signature."""

    def encode(
        self, texts: list[str], *, is_query: bool, batch_size: int = 64, progress: str | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor: ...


def forward_module(prepared: torch.nn.Module) -> torch.nn.Module | None:
    """The module to call for a forward pass, None for the encoder itself.

    FSDP1's wrapper gathers the sharded parameters in its own forward, which the wrapped module's
    forward does not, so it is called. FSDP2 (`fully_shard`) and DeepSpeed ZeRO-3 hook the encoder
    itself, and under DDP the encoder avoids DDP's forward hooks."""
    return prepared if isinstance(prepared, FullyShardedDataParallel) else None


class ShardedEncoder:
    """`Encoder.encode` split across the processes; with one process it is `Encoder.encode`."""

    def __init__(self, accelerator: Accelerator, encoder: Encoder, module: torch.nn.Module | None = None) -> None:
        self.accelerator = accelerator
        self.encoder = encoder
        self.module = module

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(
        self, texts: list[str], *, is_query: bool, batch_size: int = 64, progress: str | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor:
        """Embeddings (N, H) in float32 on the CPU on the main process (zeros on the others)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        progress = progress if self.accelerator.is_main_process else None
        options = {"is_query": is_query, "batch_size": batch_size, "progress": progress, "prompt": prompt}
        if self.module is not None:  # FSDP1: the wrapper runs the forward (see `forward_module`)
            options["module"] = self.module
        if world == 1:
            return self.encoder.encode(texts, **options)
        if not texts:
            return torch.empty(0, self.encoder.dim)
        # contiguous shares of equal length, the last ones padded with a repeated text, so that
        # the gathered rows are the texts in order followed by the padding
        share = math.ceil(len(texts) / world)
        mine = texts[rank * share : (rank + 1) * share]
        mine += texts[:1] * (share - len(mine))
        local = self.encoder.encode(mine, **options)
        return self._gather(local)[: len(texts)]

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """(share, H) from each process to (world * share, H) in process order, on the main
        process only: the others get zeros that take no memory (a stride-0 view), since only the
        main process's metrics are kept; every process holding the whole corpus could exhaust a node."""
        import torch.distributed as dist

        world, (share, dim) = self.accelerator.num_processes, local.shape
        main = self.accelerator.is_main_process
        out = torch.empty(world, share, dim) if main else None
        for start in range(0, share, GATHER_ROWS):  # the same count on every process
            block = local[start : start + GATHER_ROWS].to(self.accelerator.device).contiguous()
            parts = [torch.empty_like(block) for _ in range(world)] if main else None
            dist.gather(block, parts, dst=0)
            if main:
                out[:, start : start + block.shape[0]] = torch.stack(parts).cpu()
        if not main:
            return torch.zeros(1, dim).expand(world * share, dim)
        return out.view(world * share, dim)
