"""Length-sorted sub-batches give the loss and gradients of one padded forward, with less padding."""

import itertools
import random
from contextlib import nullcontext

import pytest
import torch

from conftest import assert_same, grads, make_pairs, tiny_decoder
from trainer.config import InfoNCEConfig, ModelConfig
from trainer.data.collate import Collator
from trainer.data.examples import Example
from trainer.losses import LossContext, build_loss
from trainer.model.encoder import Encoder
from trainer.model.sub_batches import BUCKET_ROWS, SubBatcher, best_cuts, bucket_length, sub_batches, trim
from trainer.step import cached_step, plain_step

TOLERANCE = 1e-10  # float64 throughout
LOSS = build_loss([InfoNCEConfig(kind="infonce", temperature=0.05)], LossContext(dim=32, normalized=True))
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def varied(n: int, seed: int = 0) -> list[Example]:
    """Pairs of very different lengths, so that sorting and cutting change the padding."""
    rng = random.Random(seed)
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 9, 14])))  # noqa: E731
    return [Example(text(), text(), (text(),)) for _ in range(n)]


def BACKWARD(loss: torch.Tensor, **options) -> None:
    loss.backward(**options)


def load(folder, **options) -> Encoder:
    torch.manual_seed(0)
    return Encoder.from_config(ModelConfig(name_or_path=str(folder), max_seq_length=16, **options)).double().eval()


def cost(lengths: list[int], sizes: list[int], overhead: int) -> int:
    total, start = 0, 0
    for size in sizes:
        total += size * lengths[start] + overhead
        start += size
    return total


def test_the_cuts_are_the_cheapest_of_all_contiguous_cuts():
    rng = random.Random(1)
    for _ in range(200):
        lengths = sorted((rng.randint(1, 40) for _ in range(rng.randint(1, 9))), reverse=True)
        overhead, max_rows = rng.choice([0, 5, 60]), rng.choice([None, 1, 3])
        max_tokens = rng.choice([None, 50])
        sizes = best_cuts(lengths, max_rows, max_tokens, overhead)
        assert sum(sizes) == len(lengths)
        feasible = []
        for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
            runs, size = [], 1
            for cut in cuts:
                if cut:
                    runs.append(size)
                    size = 1
                else:
                    size += 1
            runs.append(size)
            starts = [sum(runs[:i]) for i in range(len(runs))]
            if max_rows is not None and max(runs) > max_rows:
                continue
            if max_tokens is not None and any(r > 1 and r * lengths[s] > max_tokens for r, s in zip(runs, starts)):
                continue
            feasible.append(cost(lengths, runs, overhead))
        assert cost(lengths, sizes, overhead) == min(feasible)


def test_trim_drops_padding_on_either_side():
    right = {"input_ids": torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]),
             "prompt_length": torch.tensor([1, 0])}
    trimmed = trim(right)
    assert trimmed["input_ids"].tolist() == [[5, 6], [7, 0]] and trimmed["prompt_length"].tolist() == [1, 0]
    left = {"input_ids": torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]]), "attention_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])}
    assert trim(left)["input_ids"].tolist() == [[5, 6], [0, 7]]


def test_sorted_cuts_restore_the_order_and_count_the_tokens(tiny_model):
    encoder = load(tiny_model)
    features = encoder.tokenize([e.query for e in varied(12)])
    batches = sub_batches(features, overhead_tokens=0, max_rows=5)
    assert len(batches.chunks) > 2 and max(c["input_ids"].shape[0] for c in batches.chunks) <= 5
    real = int(features["attention_mask"].sum())
    assert batches.real_tokens == real and real <= batches.padded_tokens < features["attention_mask"].numel()
    ids = torch.cat([torch.nn.functional.pad(c["input_ids"], (0, 16 - c["input_ids"].shape[1])) for c in batches.chunks])
    assert torch.equal(batches.restore(ids)[:, : features["input_ids"].shape[1]], features["input_ids"])
    assert torch.equal(batches.sort(torch.arange(12)), batches.order)
    one = sub_batches(features, sort=False)
    assert len(one.chunks) == 1 and one.padded_tokens == features["attention_mask"].numel()


@pytest.mark.parametrize("family", ["bert", "qwen2-right", "qwen2-left"])
@pytest.mark.parametrize("cached", [False, True])
def test_sub_batches_give_the_loss_and_gradients_of_one_padded_forward(tiny_model, tmp_path, family, cached):
    """float64, with hard negatives, for BERT and a decoder padded on either side. Left padding
    is the one inexact case, as padding itself is: removing left padding shifts a decoder's
    rotary positions, whose tables transformers computes in float32, so it agrees to 1e-6."""
    if family == "bert":
        encoder = load(tiny_model)
        rows = varied(10)
    else:
        folder = tiny_decoder(tmp_path / "qwen2")
        encoder = load(folder, pooling="last_token")
        encoder.tokenizer.padding_side = family.removeprefix("qwen2-")
        rows = [Example(e.query.replace(" ", "")[:12], e.positive.replace(" ", "")[:12], (e.negatives[0][:12],)) for e in varied(10)]
    batch = Collator(encoder.tokenizer, 16)(rows)
    one_forward = SubBatcher(sort=False)
    sorted_cuts = SubBatcher(overhead_tokens=0)

    def step(split):
        if cached:
            return cached_step(encoder, LOSS, batch, BACKWARD, False, 4, nullcontext, split=split)[0]
        return plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=split)[0]

    reference = step(one_forward)
    reference_grads = grads(encoder)
    loss = step(sorted_cuts)
    if family == "qwen2-left":
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
        for name, grad in grads(encoder).items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6 * reference_grads[name].abs().max().item(), msg=name)
    else:
        assert loss.item() == pytest.approx(reference.item(), abs=TOLERANCE)
        assert_same(grads(encoder), reference_grads)
    real, padded = sorted_cuts.take_counts()
    real_once, padded_once = one_forward.take_counts()
    assert real == real_once and padded < padded_once  # the same texts, less padding
    assert sorted_cuts.take_counts() == (0, 0)


def test_a_token_budget_bounds_every_sub_batch_but_a_long_text_alone(tiny_model):
    encoder = load(tiny_model)
    features = encoder.tokenize([" ".join(WORDS[: 1 + i % 12]) for i in range(20)])
    batches = sub_batches(features, max_tokens=24)
    for chunk in batches.chunks:
        rows, width = chunk["attention_mask"].shape
        assert rows * width <= 24 or rows == 1


def test_the_default_step_equals_the_unsorted_step(tiny_model):
    """Callers that pass no `split` get the sorted cuts, with the same numbers."""
    encoder = load(tiny_model)
    batch = Collator(encoder.tokenizer, 16)([Example(r["query"], r["positive"], tuple(r["negatives"])) for r in make_pairs(8, seed=3)])
    reference = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=SubBatcher(sort=False))[0]
    reference_grads = grads(encoder)
    assert plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False)[0].item() == pytest.approx(reference.item(), abs=TOLERANCE)
    assert_same(grads(encoder), reference_grads)


def test_bucket_lengths_are_four_per_doubling_and_at_most_a_quarter_longer():
    assert [bucket_length(n) for n in (1, 7, 8, 9, 15, 17, 33, 50, 129, 200, 256, 257)] == [
        1, 7, 8, 10, 16, 20, 40, 56, 160, 224, 256, 320
    ]
    buckets = {bucket_length(n) for n in range(1, 513)}
    assert len([b for b in buckets if 64 <= b < 128]) == 4
    for n in range(1, 2000):
        assert n <= bucket_length(n) < 1.25 * n + 1e-9


def test_bucketed_cuts_hold_multiples_of_eight_texts_but_the_last():
    rng = random.Random(2)
    for _ in range(100):
        lengths = sorted((rng.randint(1, 300) for _ in range(rng.randint(1, 70))), reverse=True)
        max_rows = rng.choice([None, 8, 12])
        sizes = best_cuts(lengths, max_rows, None, rng.choice([0, 256]), buckets=True)
        assert sum(sizes) == len(lengths)
        assert all(size % BUCKET_ROWS == 0 or size == max_rows for size in sizes[:-1])


def test_bucketed_sub_batches_repeat_shapes_and_give_the_same_loss_and_gradients(tiny_model):
    """Batches of varied lengths use far fewer distinct shapes with buckets; right padding is
    widened with masked columns, which change neither the loss nor its gradients."""
    encoder = load(tiny_model)
    shapes = {False: set(), True: set()}
    for seed in range(12):
        features = encoder.tokenize([e.query for e in varied(24, seed)])
        for buckets in (False, True):
            batches = sub_batches(features, overhead_tokens=8, buckets=buckets)
            shapes[buckets].update(tuple(c["input_ids"].shape) for c in batches.chunks)
            if buckets:  # right padding widened up to a bucket, never cut into the texts
                for chunk in batches.chunks:
                    width = chunk["attention_mask"].shape[1]
                    assert width == bucket_length(int(chunk["attention_mask"].sum(1).max())) or width == features["input_ids"].shape[1]
    assert len(shapes[True]) < len(shapes[False])

    batch = Collator(encoder.tokenizer, 16)(varied(20, seed=5))
    reference = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=SubBatcher(sort=False))[0]
    reference_grads = grads(encoder)
    loss = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=SubBatcher(overhead_tokens=0, buckets=True))[0]
    assert loss.item() == pytest.approx(reference.item(), abs=TOLERANCE)
    assert_same(grads(encoder), reference_grads)


def test_left_padding_is_never_widened():
    left = {"input_ids": torch.tensor([[0, 0, 5, 6, 7, 8, 9, 1, 2, 3, 4], [0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 7]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])}
    assert trim(left, buckets=True)["input_ids"].tolist()[0] == [0, 5, 6, 7, 8, 9, 1, 2, 3, 4]  # 9 tokens: bucket 10
    narrow = {k: v[:, 3:] for k, v in left.items()}  # the longest text fills the row: nothing to keep
    assert trim(narrow, buckets=True)["input_ids"].shape[1] == 8
