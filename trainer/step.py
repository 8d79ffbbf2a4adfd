"""One contrastive training step: embed, (gather across processes), score, backpropagate.

Two paths give the same loss and gradients: the plain one, whose activation memory grows
with the batch, and the cached one (GradCache), which embeds in chunks of
`grad_cache_chunk_size` texts. Both work with any loss that takes embeddings.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch

from trainer.data.collate import ContrastiveBatch
from trainer.losses import WeightedLoss
from trainer.losses.distributed import gather_no_grad, gather_with_grad, local_rows, world_size
from trainer.losses.gradcache import embed_without_grad, split_features

Backward = Callable[[torch.Tensor], None]


def split_documents(
    documents: torch.Tensor, size: int, num_negatives: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B*(1+N), D) to positives (B, D) and negatives (B, N, D) or None."""
    positive = documents[:size]
    if num_negatives == 0:
        return positive, None
    return positive, documents[size:].reshape(size, num_negatives, -1)


def plain_step(
    encoder: torch.nn.Module,
    loss_fn: WeightedLoss,
    batch: ContrastiveBatch,
    backward: Backward,
    cross_device: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    query = encoder(batch.queries)  # (B, D)
    positive, negatives = split_documents(encoder(batch.documents), batch.size, batch.num_negatives)
    if cross_device:
        query, positive = gather_with_grad(query), gather_with_grad(positive)  # (W*B, D)
        negatives = gather_with_grad(negatives) if negatives is not None else None  # (W*B, N, D)
    loss, parts = loss_fn(query, positive, negatives)
    backward(loss)
    return loss.detach(), parts


def cached_step(
    encoder: torch.nn.Module,
    loss_fn: WeightedLoss,
    batch: ContrastiveBatch,
    backward: Backward,
    cross_device: bool,
    chunk_size: int,
    no_sync: Callable[[], ContextManager],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    device = batch.queries["input_ids"].device
    query_chunks = split_features(batch.queries, chunk_size)
    document_chunks = split_features(batch.documents, chunk_size)
    query, query_states = embed_without_grad(encoder, query_chunks, device)
    documents, document_states = embed_without_grad(encoder, document_chunks, device)
    positive, negatives = split_documents(documents, batch.size, batch.num_negatives)

    # loss and its gradient with respect to the (gathered) embeddings
    if cross_device:
        query, positive = gather_no_grad(query), gather_no_grad(positive)
        negatives = gather_no_grad(negatives) if negatives is not None else None
    query, positive = query.detach().requires_grad_(), positive.detach().requires_grad_()
    negatives = negatives.detach().requires_grad_() if negatives is not None else None
    leaves = [t for t in (query, positive, negatives) if t is not None]
    with torch.enable_grad():
        loss, parts = loss_fn(query, positive, negatives)
        grads = torch.autograd.grad(loss, leaves)
    if cross_device:  # every process computed the same global loss; DDP averages the W gradients
        grads = [local_rows(g, batch.size) * world_size() for g in grads]
    query_grad = grads[0]
    document_grad = torch.cat([grads[1]] + ([grads[2].reshape(-1, grads[2].shape[-1])] if len(grads) == 3 else []))

    # replay each chunk with gradient; gradients are synchronised once, after the last chunk
    chunks = list(zip(query_chunks, query_states, _row_slices(query_grad, query_chunks)))
    chunks += list(zip(document_chunks, document_states, _row_slices(document_grad, document_chunks)))
    for index, (chunk, state, grad) in enumerate(chunks):
        last = index == len(chunks) - 1
        with (nullcontext() if last else no_sync()), state.replay():
            embeddings = encoder(chunk)
            backward((embeddings * grad.to(embeddings.dtype)).sum())
    return loss.detach(), parts


def _row_slices(grad: torch.Tensor, chunks: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    sizes = [c["input_ids"].shape[0] for c in chunks]
    return list(torch.split(grad, sizes))
