import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainer.config import InfoNCEConfig
from trainer.losses import LossContext, LossInput, build_loss
from trainer.losses.inputs import Embeddings
from trainer.model.frozen import FrozenModelConfig, frozen_key

CONTEXT = LossContext(dim=8, normalized=True)


def infonce(**options):
    return InfoNCEConfig(kind="infonce", **options).build(CONTEXT)


def unit(*shape, seed=0):
    torch.manual_seed(seed)
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # (B=2, N=1, D=2)
    # columns: p0, p1, n0, n1; scores / t
    # q0: [1, .6, 0, 1] / .5 = [2, 1.2, 0, 2], label 0
    # q1: [0, .8, 1, 0] / .5 = [0, 1.6, 2, 0], label 1
    l0 = -2 + math.log(math.exp(2) + math.exp(1.2) + math.exp(0) + math.exp(2))
    l1 = -1.6 + math.log(math.exp(0) + math.exp(1.6) + math.exp(2) + math.exp(0))
    # the hard negative n1 of q1 equals p0 by value, not by text: no masking by id
    assert infonce(temperature=0.5)(LossInput.of(q, p, n)).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_in_batch_only():
    q = torch.eye(3)
    assert infonce(temperature=1.0)(LossInput.of(q, q)).item() == pytest.approx(-1 + math.log(math.e + 2), abs=1e-6)


def test_weighted_sum_and_gradient_flow():
    torch.manual_seed(0)
    q = torch.randn(4, 8, requires_grad=True)
    loss_fn = build_loss([InfoNCEConfig(kind="infonce", weight=0.5, temperature=0.1)], CONTEXT)
    total, parts = loss_fn(LossInput.of(q, torch.randn(4, 8)))
    assert total.item() == pytest.approx(0.5 * parts["infonce"].item())
    total.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def st_embeddings(q, p, n):
    """sentence-transformers' columns: anchors, positives, then one column per hard negative."""
    return [q, p] + ([] if n is None else list(n.unbind(1)))


@pytest.mark.parametrize(
    "directions,partition",
    [
        (["query_to_doc"], "joint"),
        (["query_to_doc", "doc_to_query"], "per_direction"),
        (["query_to_doc", "doc_to_query"], "joint"),
        (["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"], "joint"),
    ],
)
@pytest.mark.parametrize("hardness", [None, "in_batch_negatives", "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("num_negatives", [0, 2])
def test_equals_sentence_transformers(directions, partition, hardness, num_negatives):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    q, p = unit(6, 8, seed=1), unit(6, 8, seed=2)
    n = unit(6, num_negatives, 8, seed=3) if num_negatives else None
    strength = 0.0 if hardness is None else 5.0
    oracle = MultipleNegativesRankingLoss(
        None, scale=20.0, directions=tuple(directions), partition_mode=partition,
        hardness_mode=hardness, hardness_strength=strength,
    )
    expected = oracle.compute_loss_from_embeddings(st_embeddings(q, p, n), None)
    ours = infonce(
        temperature=0.05, directions=directions, partition=partition,
        hardness_mode=hardness or "none", hardness_strength=strength,
    )(LossInput.of(q, p, n))
    assert ours.item() == pytest.approx(expected.item(), abs=1e-10)


def test_equals_sentence_transformers_gist(monkeypatch):
    """GISTEmbed = query_to_doc + query_to_query + doc_to_doc, candidates masked by the guide.
    (With hard negatives GISTEmbed contrasts positives with positives only; doc_to_doc here also
    takes the other rows' hard negatives, so the oracle is compared on pairs.)"""
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, gist_embed
    from transformers import BertTokenizerFast

    q, p = unit(6, 8, seed=1), unit(6, 8, seed=2)
    gq, gp = unit(6, 4, seed=4), unit(6, 4, seed=5)
    gp[2] = gq[2] * 0.2 + gp[2]  # some guide scores above the pairs' own
    gq[3] = gp[1] + 0.3 * gq[1]  # query 3 is, to the guide, closer to query 1 than 1's own positive
    gp, gq = F.normalize(gp, dim=-1), F.normalize(gq, dim=-1)
    # no guide score within rounding of a pair's threshold: the two implementations compute the
    # same score by different products, and a tie would be decided by the last bit
    guide_scores = torch.cat([gq @ gp.T, gq @ gq.T, gp @ gp.T], dim=1)
    candidate = ~torch.cat([torch.eye(6, dtype=torch.bool)] * 3, dim=1)  # the pair itself and self-scores
    for margin in (0.0, 0.1):
        gap = (guide_scores - ((gq * gp).sum(-1) - margin)[:, None]).abs()
        assert (gap[candidate] > 1e-6).all()
    tokenizer = BertTokenizerFast(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4})
    model = SimpleNamespace(tokenizer=tokenizer, max_seq_length=16, tag="model")
    guide = SimpleNamespace(tokenizer=tokenizer, max_seq_length=16, tag="guide")
    monkeypatch.setattr(gist_embed, "embed_columns", lambda m, features: [f[m.tag] for f in features])
    guide_config = FrozenModelConfig(name_or_path="guide")
    for strategy, margin in [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05)]:
        oracle = GISTEmbedLoss(model, guide, temperature=0.05, margin_strategy=strategy, margin=margin)
        columns = [{"model": a, "guide": b} for a, b in [(q, gq), (p, gp)]]
        expected = oracle(columns, None)
        inputs = LossInput.of(q, p, frozen={frozen_key(guide_config): Embeddings(gq, gp)})
        ours = infonce(
            temperature=0.05, directions=["query_to_doc", "query_to_query", "doc_to_doc"],
            guide=guide_config, false_negative_margin=margin, margin_strategy=strategy,
        )(inputs)
        assert ours.item() == pytest.approx(expected.item(), abs=1e-10), (strategy, margin)


def reference_masked(q, p, n, masked: set[tuple[int, int]], temperature=0.05) -> float:
    """Hand loop: query_to_doc cross-entropy with the listed (row, column) candidates left out."""
    documents = torch.cat([p, n.reshape(-1, n.shape[-1])])
    total = 0.0
    for i in range(q.shape[0]):
        logits = [(q[i] @ documents[c]).item() / temperature for c in range(documents.shape[0]) if (i, c) not in masked]
        total += -(q[i] @ p[i]).item() / temperature + math.log(sum(math.exp(x) for x in logits))
    return total / q.shape[0]


def test_masks_exactly_the_planted_duplicates():
    q, p, n = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(4, 1, 8, seed=3)
    inputs = LossInput.of(q, p, n)
    # row 1's hard negative (column 4 + 1 = 5) is row 0's positive text; row 3's positive is row 2's too
    inputs.negative_ids[1, 0] = inputs.positive_ids[0]
    inputs.positive_ids[3] = inputs.positive_ids[2]
    planted = {(0, 5), (3, 2), (2, 3)}
    assert infonce()(inputs).item() == pytest.approx(reference_masked(q, p, n, planted), abs=1e-10)
    assert infonce(mask_duplicates=False)(inputs).item() == pytest.approx(reference_masked(q, p, n, set()), abs=1e-10)


def test_rows_without_in_batch_negatives_see_only_their_own_documents():
    q, p, n = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(4, 2, 8, seed=3)
    inputs = LossInput.of(q, p, n, in_batch=torch.tensor([True, False, True, False]))
    own = {1: {1, 4 + 2, 4 + 3}, 3: {3, 4 + 6, 4 + 7}}
    masked = {(i, c) for i in own for c in range(12) if c not in own[i]}
    assert infonce()(inputs).item() == pytest.approx(reference_masked(q, p, n, masked), abs=1e-10)


def test_model_margin_masks_candidates_scored_above_the_positive():
    q, p, n = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(5, 1, 8, seed=3)
    documents = torch.cat([p, n[:, 0]])
    scores = q @ documents.T
    margin = 0.1
    masked = {(i, c) for i in range(5) for c in range(10) if c != i and scores[i, c] > scores[i, i] - margin}
    assert masked, "the random data should plant some false negatives"
    ours = infonce(false_negative_margin=margin)(LossInput.of(q, p, n)).item()
    assert ours == pytest.approx(reference_masked(q, p, n, masked), abs=1e-10)


def test_focal_weighting_matches_hand_computation():
    q, p = unit(5, 8, seed=1), unit(5, 8, seed=2)
    scores = q @ p.T / 0.05
    log_p = torch.log_softmax(scores, dim=1).diagonal()
    expected = (-log_p * (1 - log_p.exp()) ** 2).mean()
    assert infonce(focal_gamma=2.0)(LossInput.of(q, p)).item() == pytest.approx(expected.item(), abs=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_progressive_focal_weighting_follows_its_schedule_over_training(schedule):
    q, p = unit(5, 8, seed=1), unit(5, 8, seed=2)
    log_p = torch.log_softmax(q @ p.T / 0.05, dim=1).diagonal()
    loss = infonce(focal_gamma=0.0, focal_gamma_end=3.0, focal_schedule=schedule, focal_normalize=True)
    for progress in (0.0, 0.25, 0.5, 0.9):
        ramp = progress if schedule == "linear" else (1 - math.cos(math.pi * progress)) / 2
        weights = (1 - log_p.exp()) ** (3.0 * ramp)
        expected = (-log_p * weights / weights.mean()).mean()
        got = loss(LossInput.of(q, p, progress=progress)).item()
        assert got == pytest.approx(expected.item(), abs=1e-10)
    # at the start every query counts alike: plain InfoNCE
    assert loss(LossInput.of(q, p, progress=0.0)).item() == pytest.approx(infonce()(LossInput.of(q, p)).item(), abs=1e-12)


def test_a_training_step_tells_the_loss_how_far_training_is(tmp_path, tiny_model, pairs_file, monkeypatch):
    from accelerate.state import AcceleratorState

    from conftest import write_recipe
    from trainer import step
    from trainer.config import load_recipe
    from trainer.loop import train

    seen = []
    build = step.loss_input
    monkeypatch.setattr(step, "loss_input", lambda *a, **k: seen.append(build(*a, **k).progress) or build(*a, **k))
    try:
        train(load_recipe(write_recipe(tmp_path, tiny_model, pairs_file)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == [0.0, 0.25, 0.5, 0.75]


def test_mixed_negatives_match_a_hand_computation():
    q, p, n = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(4, 2, 8, seed=3)
    t, count, pool = 0.05, 3, 4
    torch.manual_seed(7)
    got = infonce(temperature=t, mixed_negatives=count, mix_pool=pool)(LossInput.of(q, p, n))
    torch.manual_seed(7)
    first = torch.randint(pool, (4, count))
    second = (first + 1 + torch.randint(pool - 1, (4, count))) % pool
    alpha = torch.rand(4, count, 1)
    documents = torch.cat([p, n.reshape(-1, 8)])  # (12, D)
    scores = q @ documents.T
    expected = []
    for i in range(4):
        others = [c for c in scores[i].argsort(descending=True).tolist() if c != i][:pool]
        mixes = [F.normalize(alpha[i, m] * documents[others[first[i, m]]] + (1 - alpha[i, m]) * documents[others[second[i, m]]], dim=0)
                 for m in range(count)]
        row = torch.cat([scores[i], torch.stack(mixes) @ q[i]]) / t
        expected.append(torch.logsumexp(row, 0) - row[i])
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-10)
    assert (first != second).all()


def test_mixed_negatives_raise_the_loss_and_push_only_the_query():
    q, p, n = unit(6, 8, seed=4), unit(6, 8, seed=5), unit(6, 1, 8, seed=6)
    q.requires_grad_(True)
    p.requires_grad_(True)
    plain = infonce()(LossInput.of(q, p, n))
    mixed = infonce(mixed_negatives=4)(LossInput.of(q, p, n))
    assert mixed.item() > plain.item()  # more negatives in the softmax, never fewer
    (grad_plain_p,) = torch.autograd.grad(plain, p)
    (grad_q, grad_p) = torch.autograd.grad(infonce(mixed_negatives=4)(LossInput.of(q, p, n)), (q, p))
    assert grad_q.abs().sum() > 0
    # the mixes are detached: the documents' gradient only changes through the softmax's new mass
    assert not torch.allclose(grad_p, grad_plain_p)


def test_mixed_negatives_leave_out_masked_documents():
    # two rows with one document each and a pool larger than what is left: the only other
    # candidate is masked (same text as the positive), so no mix can be made and the loss is plain
    q, p = unit(2, 8, seed=8), unit(2, 8, seed=9)
    ids = {"positive_ids": torch.tensor([10, 10])}
    plain = infonce()(LossInput.of(q, p, **ids))
    mixed = infonce(mixed_negatives=2, mix_pool=4)(LossInput.of(q, p, **ids))
    assert mixed.item() == pytest.approx(plain.item(), abs=1e-12)


@pytest.mark.parametrize("options,message", [({"mixed_negatives": -1}, "mixed_negatives"), ({"mix_pool": 1}, "mix_pool")])
def test_mixed_negative_options_are_checked(options, message):
    from trainer.schema import FieldError

    with pytest.raises(FieldError, match=message):
        InfoNCEConfig(kind="infonce", **options)


def test_learned_temperature_is_bounded_and_learns():
    loss = infonce(temperature=0.05, learn_temperature=True, min_temperature=0.01, max_temperature=0.2)
    assert float(loss.temperature.detach()) == pytest.approx(0.05)
    q, p = unit(6, 8, seed=1), unit(6, 8, seed=2)
    value = loss(LossInput.of(q.float(), p.float()))
    value.backward()
    assert loss.temperature_logit.grad is not None and loss.temperature_logit.grad.abs() > 0
    with torch.no_grad():
        loss.temperature_logit.fill_(100.0)
    assert float(loss.temperature.detach()) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"directions": ["doc_to_query"]}, "must include query_to_doc"),
        ({"directions": ["query_to_doc", "query_to_query"], "partition": "per_direction"}, "per_direction"),
        ({"hardness_mode": "hard_negatives"}, "hardness_strength"),
        ({"learn_temperature": True, "temperature": 0.5}, "strictly between"),
        ({"temperature": 0}, "must be > 0"),
    ],
)
def test_bad_options_name_the_field(options, message):
    from trainer.schema import FieldError

    with pytest.raises(FieldError, match=message):
        InfoNCEConfig(kind="infonce", **options)
