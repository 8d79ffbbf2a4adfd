"""bf16 autocast (training.mixed_precision: bf16) runs on a CPU and stays close to float32."""

import json

import pytest
import torch

from conftest import make_pairs, write_recipe
from trainer.cli import main
from trainer.config import InfoNCEConfig, ModelConfig
from trainer.data.collate import Collator
from trainer.data.examples import Example
from trainer.losses import LossContext, build_loss
from trainer.model.encoder import Encoder
from trainer.step import plain_step


def loss_and_grads(encoder: Encoder, batch, autocast: bool) -> tuple[float, torch.Tensor]:
    loss_fn = build_loss([InfoNCEConfig(kind="infonce", temperature=0.05)], LossContext(dim=encoder.dim, normalized=True))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = plain_step(encoder, loss_fn, batch, lambda loss, **o: loss.backward(**o), cross_device=False)
    grads = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
    encoder.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_a_bf16_step_is_within_two_percent_of_float32_on_a_fixed_batch(tiny_model):
    torch.manual_seed(0)
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)).eval()
    rows = [Example(r["query"], r["positive"], tuple(r["negatives"])) for r in make_pairs(16, seed=4)]
    batch = Collator(encoder.tokenizer, 16)(rows)
    fp32_loss, fp32_grads = loss_and_grads(encoder, batch, autocast=False)
    bf16_loss, bf16_grads = loss_and_grads(encoder, batch, autocast=True)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.02)
    assert torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0) > 0.98
    assert bf16_loss != fp32_loss  # autocast really ran in bf16
    assert all(p.dtype == torch.float32 for p in encoder.parameters())  # weights stay float32


def test_a_bf16_run_trains_through_the_cli(tmp_path, tiny_model, pairs_file):
    from accelerate.state import AcceleratorState

    recipe = write_recipe(tmp_path, tiny_model, pairs_file)
    try:
        assert main(["train", str(recipe), "training.mixed_precision=bf16", "training.max_steps=8", "optimizer.lr=3e-3"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 8 and all(loss == loss for loss in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
