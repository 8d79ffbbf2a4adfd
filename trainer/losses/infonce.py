"""InfoNCE over in-batch and hard negatives.

Inputs: query (B, D), positive (B, D) and optional negatives (B, N, D) embeddings.
Each query is scored against every positive in the batch and every hard negative of every
query: scores (B, B*(1+N)); the right column for query i is i. The loss is the mean
cross-entropy of these scores divided by the temperature.

References: van den Oord et al. 2018 (CPC); Henderson et al. 2017 (multiple negatives
ranking); Karpukhin et al. 2020 (DPR, in-batch plus hard negatives).

Example::

    loss = InfoNCE(temperature=0.05)(q, p, n)   # q, p: (32, 384), n: (32, 3, 384)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class InfoNCE(torch.nn.Module):
    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        documents = positive  # (B, D)
        if negatives is not None and negatives.shape[1] > 0:
            documents = torch.cat([positive, negatives.reshape(-1, negatives.shape[-1])])  # (B*(1+N), D)
        scores = query @ documents.T / self.temperature  # (B, B*(1+N))
        labels = torch.arange(query.shape[0], device=query.device)
        return F.cross_entropy(scores.float(), labels)
