import math

import pytest
import torch

from trainer.config import InfoNCEConfig
from trainer.losses import build_loss
from trainer.losses.infonce import InfoNCE


def test_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # (B=2, N=1, D=2)
    t = 0.5
    # columns: p0, p1, n0, n1; scores / t
    # q0: [1, .6, 0, 1] / .5 = [2, 1.2, 0, 2], label 0
    # q1: [0, .8, 1, 0] / .5 = [0, 1.6, 2, 0], label 1
    l0 = -2 + math.log(math.exp(2) + math.exp(1.2) + math.exp(0) + math.exp(2))
    l1 = -1.6 + math.log(math.exp(0) + math.exp(1.6) + math.exp(2) + math.exp(0))
    expected = (l0 + l1) / 2
    assert InfoNCE(temperature=t)(q, p, n).item() == pytest.approx(expected, abs=1e-6)


def test_in_batch_only():
    q = torch.eye(3)
    loss = InfoNCE(temperature=1.0)(q, q).item()
    expected = -1 + math.log(math.e + 2)
    assert loss == pytest.approx(expected, abs=1e-6)


def test_weighted_sum_and_gradient_flow():
    torch.manual_seed(0)
    q = torch.randn(4, 8, requires_grad=True)
    p = torch.randn(4, 8)
    loss_fn = build_loss([InfoNCEConfig(kind="infonce", weight=0.5, temperature=0.1)])
    total, parts = loss_fn(q, p)
    assert total.item() == pytest.approx(0.5 * parts["infonce"].item())
    total.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
