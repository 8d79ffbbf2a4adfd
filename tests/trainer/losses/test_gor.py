import pytest
import torch
import torch.nn.functional as F

from trainer.losses import LossContext, LossInput
from trainer.losses.gor import GORConfig


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.0, 1.0), (2.0, 0.5)])
def test_equals_sentence_transformers(aggregation, weights):
    from sentence_transformers.sentence_transformer.losses import GlobalOrthogonalRegularizationLoss

    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(*s, dtype=torch.float64), dim=-1) for s in [(6, 8), (6, 8), (6, 2, 8)])
    oracle = GlobalOrthogonalRegularizationLoss(None, mean_weight=weights[0], second_moment_weight=weights[1], aggregation=aggregation)
    expected = sum(oracle.compute_loss_from_embeddings([q, p, n[:, 0], n[:, 1]]).values())
    loss = GORConfig(kind="gor", mean_weight=weights[0], second_moment_weight=weights[1], aggregation=aggregation)
    ours = loss.build(LossContext(dim=8, normalized=True))(LossInput.of(q, p, n))
    assert ours.item() == pytest.approx(expected.item(), abs=1e-10)


def test_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # off-diagonal similarities of q: [0, 1, 0, 0, 1, 0] -> M1 = 1/3, M2 = 1/3; of p = q the same
    loss = GORConfig(kind="gor").build(LossContext(dim=2, normalized=True))(LossInput.of(q, q.clone()))
    assert loss.item() == pytest.approx((1 / 3) ** 2 + max(0.0, 1 / 3 - 1 / 2), abs=1e-12)
