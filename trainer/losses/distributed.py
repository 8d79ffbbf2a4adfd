"""Cross-device negatives: gather embeddings from every process.

Every process gathers the queries, positives and negatives of all processes and computes
the same loss over the global batch, so each query is scored against every document of
every process. The gather keeps the gradient (its backward sums the gradients that all
processes send to the local rows), and DDP's gradient averaging then gives exactly the
gradient of a single process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W processes to (W*B, ...), rank-major, differentiable."""
    if world_size() == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor.contiguous()))


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """As `gather_with_grad`, for detached (cached) embeddings."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def local_rows(tensor: torch.Tensor, rows_per_rank: int) -> torch.Tensor:
    """This process's slice of a rank-major gathered tensor."""
    start = rank() * rows_per_rank
    return tensor[start : start + rows_per_rank]
