"""One contrastive training step: embed, build the loss input, (gather across processes),
score, backpropagate.

Two paths give the same loss and gradients: the plain one, whose activation memory grows
with the batch, and the cached one (GradCache), which embeds in chunks of
`grad_cache_chunk_size` texts. Both work with any loss term, including terms with parameters
(their gradient comes from the loss directly) and terms that ignore some of the embeddings.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager

import torch

from trainer.data.collate import ContrastiveBatch
from trainer.losses import WeightedLoss
from trainer.losses.distributed import local_rows, world_size
from trainer.losses.gradcache import embed_without_grad
from trainer.losses.inputs import Embeddings, LossInput
from trainer.model.cross_encoder import CrossEncoderScorer
from trainer.model.frozen import embed_frozen
from trainer.model.sub_batches import SubBatcher, embed_in_sub_batches

Backward = Callable[..., None]
LossFn = Callable[[LossInput], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def split_documents(
    documents: torch.Tensor, size: int, num_negatives: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B*(1+N), ...) to positives (B, ...) and negatives (B, N, ...) or None."""
    positive = documents[:size]
    if num_negatives == 0:
        return positive, None
    return positive, documents[size:].reshape(size, num_negatives, *documents.shape[1:])


def loss_input(
    batch: ContrastiveBatch,
    query: torch.Tensor,
    documents: torch.Tensor,
    frozen: dict[str, torch.nn.Module],
    normalized: bool,
    chunk_size: int | None = None,
    layers: tuple[int, ...] = (),
) -> LossInput:
    """The loss's view of a batch: its embeddings (B, D) / (B*(1+N), D), ids, sources, teacher
    scores, and the same texts embedded by each frozen encoder. With `layers`, the embeddings are
    (B, 1+K, D) / (B*(1+N), 1+K, D), the final ones first, then one per entry of `layers`."""
    positive = negatives = positive_ids = negative_ids = None  # a batch of single texts has no documents
    if documents is not None:
        positive, negatives = split_documents(documents, batch.size, batch.num_negatives)
        positive_ids, negative_ids = split_documents(batch.document_ids, batch.size, batch.num_negatives)
    model = Embeddings(query, positive, negatives)
    layer_embeddings = {}
    if layers:
        layer_embeddings = {layer: model.map(lambda t, k=k: t[..., k, :]) for k, layer in enumerate(layers, start=1)}
        model = model.map(lambda t: t[..., 0, :])
    frozen_embeddings, frozen_scores = {}, {}
    for key, encoder in frozen.items():
        texts = batch.frozen[key]
        if isinstance(encoder, CrossEncoderScorer):  # scores the candidates its terms ask for
            if texts.document_texts is not None:
                scores = encoder.score(texts, batch.size, batch.num_negatives, encoder.candidates, chunk_size)
                frozen_scores[f"{key}|{encoder.candidates}"] = scores
            continue
        frozen_query = embed_frozen(encoder, texts.queries, chunk_size, texts.query_ids)
        frozen_positive = frozen_negatives = None
        if texts.documents is not None:
            docs = embed_frozen(encoder, texts.documents, chunk_size, texts.document_ids)
            frozen_positive, frozen_negatives = split_documents(docs, batch.size, batch.num_negatives)
        frozen_embeddings[key] = Embeddings(frozen_query, frozen_positive, frozen_negatives)
    return LossInput(
        query=model.query,
        positive=model.positive,
        negatives=model.negatives,
        query_ids=batch.query_ids,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
        source=batch.source,
        in_batch=batch.in_batch,
        teacher_scores=batch.teacher_scores,
        frozen=frozen_embeddings,
        frozen_scores=frozen_scores,
        layers=layer_embeddings,
        normalized=normalized,
        progress=batch.progress,
    )


def plain_step(
    encoder: torch.nn.Module,
    loss_fn: LossFn,
    batch: ContrastiveBatch,
    backward: Backward,
    cross_device: bool,
    frozen: dict[str, torch.nn.Module] | None = None,
    normalized: bool = True,
    layers: tuple[int, ...] = (),
    split: SubBatcher | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each column (queries, documents) is embedded in length-sorted sub-batches (`split`)."""
    embed = partial(encoder, layers=layers) if layers else encoder
    split = split or SubBatcher()
    query = embed_in_sub_batches(embed, split(batch.queries))  # (B, D), or (B, 1+K, D) with layers
    documents = None  # (B*(1+N), D), or (B*(1+N), 1+K, D)
    if batch.documents is not None:
        documents = embed_in_sub_batches(embed, split(batch.documents))
    inputs = loss_input(batch, query, documents, frozen or {}, normalized, layers=layers)
    if cross_device:
        inputs = inputs.gather()  # (W*B, ...) for every field
    loss, parts = loss_fn(inputs)
    backward(loss)
    return loss.detach(), parts


def cached_step(
    encoder: torch.nn.Module,
    loss_fn: LossFn,
    batch: ContrastiveBatch,
    backward: Backward,
    cross_device: bool,
    chunk_size: int,
    no_sync: Callable[[], ContextManager],
    frozen: dict[str, torch.nn.Module] | None = None,
    normalized: bool = True,
    loss_parameters: list[torch.nn.Parameter] | None = None,
    layers: tuple[int, ...] = (),
    split: SubBatcher | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The chunks are length-sorted sub-batches of at most `chunk_size` texts (`split`)."""
    embed = partial(encoder, layers=layers) if layers else encoder
    split = split or SubBatcher()
    device = batch.queries["input_ids"].device
    query_split = split(batch.queries, max_rows=chunk_size)
    document_split = None if batch.documents is None else split(batch.documents, max_rows=chunk_size)
    query, query_states = embed_without_grad(embed, query_split.chunks, device)
    query = query_split.restore(query)
    documents, document_states = None, []
    if document_split is not None:
        documents, document_states = embed_without_grad(embed, document_split.chunks, device)
        documents = document_split.restore(documents)
    inputs = loss_input(batch, query, documents, frozen or {}, normalized, chunk_size, layers)

    # the loss and its gradient with respect to the (gathered) embeddings, earlier layers' included
    if cross_device:
        inputs = inputs.gather()
    leaves = [e.map(lambda t: t.detach().requires_grad_()) for e in inputs.model_embeddings()]
    inputs = inputs.with_model_embeddings(leaves)
    tensors = [t for e in leaves for t in e.tensors()]
    with torch.enable_grad():
        loss, parts = loss_fn(inputs)
        parameters = [p for p in loss_parameters or [] if p.requires_grad]
        grads = torch.autograd.grad(loss, tensors, retain_graph=bool(parameters), allow_unused=True)
        if parameters:  # the loss's own parameters (a learnable temperature) get their gradient here
            backward(loss, inputs=parameters)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]  # an ignored input
    if cross_device:  # every process computed the same global loss; DDP averages the W gradients
        grads = [local_rows(g, batch.size) * world_size() for g in grads]
    query_grads, document_grads = [], []
    for embeddings in leaves:  # per layer: query (B, D), documents (B*(1+N), D) when there are any
        count = len(embeddings.tensors())
        mine, grads = grads[:count], grads[count:]
        query_grads.append(mine[0])
        if count > 1:
            document_grads.append(torch.cat([mine[1]] + ([mine[2].reshape(-1, mine[2].shape[-1])] if count == 3 else [])))

    # replay each chunk with gradient; gradients are synchronised once, after the last chunk
    chunks = list(zip(query_split.chunks, query_states, query_split.split(query_split.sort(_per_text(query_grads, layers)))))
    if document_split is not None:
        document_grad = document_split.sort(_per_text(document_grads, layers))
        chunks += list(zip(document_split.chunks, document_states, document_split.split(document_grad)))
    for index, (chunk, state, grad) in enumerate(chunks):
        last = index == len(chunks) - 1
        with (nullcontext() if last else no_sync()), state.replay():
            embeddings = embed(chunk)
            backward((embeddings * grad.to(embeddings.dtype)).sum())
    return loss.detach(), parts


def _per_text(grads: list[torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    """One gradient per text: (T, D), or (T, 1+K, D) stacked over the layers the encoder returns."""
    return torch.stack(grads, dim=1) if layers else grads[0]

