import torch

from trainer.model.pooling import cls_pool, last_token_pool, mean_pool

HIDDEN = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (B=2, L=3, H=2)


def test_mean_ignores_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mean_pool(HIDDEN, mask)
    assert torch.equal(out[0], (HIDDEN[0, 0] + HIDDEN[0, 1]) / 2)
    assert torch.equal(out[1], HIDDEN[1].mean(0))


def test_cls_takes_first_token():
    assert torch.equal(cls_pool(HIDDEN, torch.ones(2, 3)), HIDDEN[:, 0])


def test_last_token_right_and_left_padding():
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(last_token_pool(HIDDEN, right), torch.stack([HIDDEN[0, 1], HIDDEN[1, 2]]))
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert torch.equal(last_token_pool(HIDDEN, left), torch.stack([HIDDEN[0, 2], HIDDEN[1, 2]]))
