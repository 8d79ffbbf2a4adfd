"""The distillation terms: hand computations, sentence-transformers' losses as oracles, the
candidates and the projection, and how they sit with single-text batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.errors import RunError
from trainer.losses import LossContext, LossInput, build_loss
from trainer.losses.distill_kl import DistillKLConfig
from trainer.losses.embed_distill import EmbedDistillConfig
from trainer.losses.inputs import Embeddings
from trainer.losses.jasper import JasperConfig, relative_similarity
from trainer.losses.margin_mse import MarginMSEConfig
from trainer.model.frozen import FrozenModelConfig, frozen_key
from trainer.schema import FieldError

TEACHER = FrozenModelConfig(name_or_path="teacher")
KEY = frozen_key(TEACHER)


def context(dim=8, teacher_dim=8):
    return LossContext(dim=dim, normalized=True, frozen_dim=lambda config: teacher_dim)


def unit(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=generator), dim=-1)


def batch(size=4, negatives=2, dim=8, teacher_dim=8, seed=0, **extras):
    q, p, n = unit(size, dim, seed=seed), unit(size, dim, seed=seed + 1), unit(size, negatives, dim, seed=seed + 2)
    teacher = Embeddings(unit(size, teacher_dim, seed=seed + 3), unit(size, teacher_dim, seed=seed + 4),
                         unit(size, negatives, teacher_dim, seed=seed + 5))
    return LossInput.of(q, p, n, frozen={KEY: teacher}, **extras)


# ---------------------------------------------------------------------------- distill_kl


def test_distill_kl_by_hand():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    n = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    scores = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    loss = DistillKLConfig(kind="distill_kl", temperature=0.5, teacher_temperature=2.0).build(context(2))
    value = loss(LossInput.of(q, p, n, teacher_scores=scores)).item()
    t = [math.exp(1.0) / (math.exp(1.0) + math.exp(0.5)), math.exp(0.5) / (math.exp(1.0) + math.exp(0.5))]
    s = [math.exp(1.2) / (math.exp(1.2) + 1), 1 / (math.exp(1.2) + 1)]  # scores .6 and 0 over .5
    assert value == pytest.approx(sum(ti * math.log(ti / si) for ti, si in zip(t, s)), abs=1e-9)


@pytest.mark.parametrize("student_t,teacher_t", [(0.05, None), (0.1, 1.0)])
def test_distill_kl_matches_sentence_transformers(student_t, teacher_t):
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss

    inputs = batch(negatives=3)
    scores = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    inputs.teacher_scores = scores
    ours = DistillKLConfig(kind="distill_kl", temperature=student_t, teacher_temperature=teacher_t).build(context())(inputs)
    theirs = DistillKLDivLoss(None, student_temperature=student_t, teacher_temperature=teacher_t or student_t)
    columns = [inputs.query, inputs.positive, *inputs.negatives.unbind(1)]
    expected = theirs.compute_loss_from_embeddings(columns, scores) / student_t**2
    assert ours.item() == pytest.approx(expected.item(), rel=1e-9)


def test_distill_kl_online_teacher_scores_in_batch_documents():
    inputs = batch()
    loss = DistillKLConfig(kind="distill_kl", teacher=TEACHER).build(context())
    assert loss.config.candidates == "in_batch"
    teacher = inputs.frozen[KEY]
    student_logits = inputs.query @ inputs.embeddings.documents.T / 0.05
    teacher_logits = teacher.query @ teacher.documents.T / 0.05
    expected = F.kl_div(F.log_softmax(student_logits, -1), F.softmax(teacher_logits, -1), reduction="batchmean")
    assert loss(inputs).item() == pytest.approx(expected.item(), rel=1e-9)


def test_distill_kl_rows_without_in_batch_negatives_see_only_their_own_documents():
    inputs = batch(in_batch=torch.tensor([False, True, True, True]))
    value = DistillKLConfig(kind="distill_kl", teacher=TEACHER).build(context())(inputs)
    own = DistillKLConfig(kind="distill_kl", teacher=TEACHER, candidates="own").build(context())
    row0 = LossInput.of(inputs.query[:1], inputs.positive[:1], inputs.negatives[:1],
                        frozen={KEY: inputs.frozen[KEY].map(lambda t: t[:1])})
    expected = (own(row0).item() + sum(row_kl(inputs, i) for i in range(1, 4))) / 4
    assert value.item() == pytest.approx(expected, rel=1e-9)


def row_kl(inputs, row, temperature=0.05):
    teacher = inputs.frozen[KEY]
    s = inputs.query[row] @ inputs.embeddings.documents.T / temperature
    t = teacher.query[row] @ teacher.documents.T / temperature
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum").item()


def test_distill_kl_bad_config():
    with pytest.raises(FieldError, match="in_batch needs a teacher model"):
        DistillKLConfig(kind="distill_kl", candidates="in_batch")
    with pytest.raises(FieldError, match="temperature"):
        DistillKLConfig(kind="distill_kl", temperature=0)
    inputs = batch()
    with pytest.raises(RunError, match="no teacher scores"):
        DistillKLConfig(kind="distill_kl").build(context())(inputs)


# ---------------------------------------------------------------------------- margin_mse


def test_margin_mse_by_hand():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    n = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    scores = torch.tensor([[5.0, 4.0, 1.0]], dtype=torch.float64)
    value = MarginMSEConfig(kind="margin_mse").build(context(2))(LossInput.of(q, p, n, teacher_scores=scores)).item()
    # student margins .6 - 0 = .6 and .6 + 1 = 1.6; teacher 1 and 4
    assert value == pytest.approx(((0.6 - 1) ** 2 + (1.6 - 4) ** 2) / 2)


@pytest.mark.parametrize("negatives", [1, 3])
def test_margin_mse_matches_sentence_transformers(negatives):
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss

    inputs = batch(negatives=negatives)
    scores = torch.randn(4, 1 + negatives, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inputs.teacher_scores = scores
    ours = MarginMSEConfig(kind="margin_mse").build(context())(inputs)
    columns = [inputs.query, inputs.positive, *inputs.negatives.unbind(1)]
    expected = MarginMSELoss(None).compute_loss_from_embeddings(columns, scores)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-9)


def test_margin_mse_in_batch_with_a_teacher_model():
    inputs = batch(negatives=1)
    value = MarginMSEConfig(kind="margin_mse", teacher=TEACHER).build(context())(inputs).item()
    teacher = inputs.frozen[KEY]
    s = inputs.query @ inputs.embeddings.documents.T
    t = teacher.query @ teacher.documents.T
    errors = [((s[i, i] - s[i, c]) - (t[i, i] - t[i, c])) ** 2 for i in range(4) for c in range(8) if c != i]
    assert value == pytest.approx(torch.stack(errors).mean().item(), rel=1e-9)


def test_margin_mse_needs_candidates():
    inputs = LossInput.of(unit(3, 8), unit(3, 8, seed=1), teacher_scores=torch.ones(3, 1))
    with pytest.raises(RunError, match="no hard negatives"):
        MarginMSEConfig(kind="margin_mse").build(context())(inputs)


# ---------------------------------------------------------------------------- embed_distill


@pytest.mark.parametrize("metric", ["mse", "cosine", "l2"])
def test_embed_distill_matches_sentence_transformers(metric):
    from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss

    inputs = batch(negatives=1)
    ours = EmbedDistillConfig(kind="embed_distill", teacher=TEACHER, metric=metric).build(context())(inputs)
    theirs = EmbedDistillLoss(None, distance_metric=metric)
    teacher = inputs.frozen[KEY]
    columns = [inputs.query, inputs.positive, inputs.negatives[:, 0]]
    expected = theirs.compute_loss_from_embeddings(columns, [teacher.query, teacher.positive, teacher.negatives[:, 0]])
    assert ours.item() == pytest.approx(expected.item(), rel=1e-9)


def test_embed_distill_mse_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    teacher = Embeddings(torch.tensor([[0.0, 1.0]]), None)
    inputs = LossInput.of(q, None, frozen={KEY: teacher})
    assert EmbedDistillConfig(kind="embed_distill", teacher=TEACHER).build(context(2, 2))(inputs).item() == pytest.approx(1.0)


def test_embed_distill_projection_when_dimensions_differ():
    loss = EmbedDistillConfig(kind="embed_distill", teacher=TEACHER).build(context(8, 12))
    (linear,) = loss.projection.maps.values()
    assert linear.in_features == 8 and linear.out_features == 12
    inputs = batch(teacher_dim=12)
    inputs = inputs.map_tensors(lambda t: t.float())
    value = loss(inputs)
    value.backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert EmbedDistillConfig(kind="embed_distill", teacher=TEACHER).build(context(8, 8)).projection is None
    assert EmbedDistillConfig(kind="embed_distill", teacher=TEACHER, projection=True).build(context(8, 8)).projection is not None
    with pytest.raises(RunError, match="set projection: true"):
        EmbedDistillConfig(kind="embed_distill", teacher=TEACHER, projection=False).build(context(8, 12))


# ---------------------------------------------------------------------------- jasper


def test_jasper_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    inputs = LossInput.of(student, None, frozen={KEY: Embeddings(teacher, None)})
    loss = JasperConfig(kind="jasper", teacher=TEACHER, cosine_weight=1, similarity_weight=1, relative_weight=1, margin=0.1)
    value = loss.build(context(2, 2))(inputs).item()
    cosine = ((1 - 1) + (1 - 0.6) + (1 - 0.8)) / 3
    s = [[1, 0, 0.6], [0, 1, 0.8], [0.6, 0.8, 1]]
    t = [[1, 0.8, 0], [0.8, 1, 0.6], [0, 0.6, 1]]
    similarity = sum((s[i][j] - t[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    hinges = []
    for i in range(3):
        for j in range(3):
            for k in range(3):
                if i not in (j, k) and t[i][j] > t[i][k]:
                    hinges.append(max(0.0, 0.1 - (s[i][j] - s[i][k])))
    assert value == pytest.approx(cosine + similarity + sum(hinges) / len(hinges), abs=1e-9)


def test_jasper_compares_similarity_matrices_in_the_students_own_space():
    """Widths that differ from the teacher's: the similarity and relative terms read the student's
    own vectors (what the exported model serves); only the cosine term goes through the projection."""
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    teacher = F.normalize(torch.tensor([[1.0, 0.0, 0.5], [0.8, 0.6, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64), dim=-1)
    inputs = LossInput.of(student, None, frozen={KEY: Embeddings(teacher, None)})
    structure = JasperConfig(kind="jasper", teacher=TEACHER, cosine_weight=0, similarity_weight=1, relative_weight=0)
    term = structure.build(context(2, 3))
    assert term.projection is None  # nothing would read it
    expected = F.mse_loss(student @ student.T, teacher @ teacher.T).item()
    assert term(inputs).item() == pytest.approx(expected, abs=1e-12)

    full = JasperConfig(kind="jasper", teacher=TEACHER, cosine_weight=1, similarity_weight=1, relative_weight=0).build(context(2, 3))
    (linear,) = full.projection.maps.values()
    projected = F.normalize(linear(student.float()).double(), dim=-1)
    cosine = (1 - (projected * teacher).sum(-1)).mean().item()
    assert full(inputs).item() == pytest.approx(cosine + expected, abs=1e-6)
    with pytest.raises(FieldError, match="cosine_weight is 0"):
        JasperConfig(kind="jasper", teacher=TEACHER, cosine_weight=0, projection=True)


def test_jasper_under_matryoshka_trains_each_cut_itself():
    """At a cut narrower than the teacher, the gradient of the similarity terms reaches the cut's
    own dimensions and nothing else (no projection in between)."""
    from trainer.losses.matryoshka import MatryoshkaConfig

    inner = JasperConfig(kind="jasper", teacher=TEACHER, cosine_weight=0)
    loss = MatryoshkaConfig(kind="matryoshka", dims=[4], terms=[inner]).build(context(8, 8))
    assert loss.terms[0].projection is None
    texts = unit(5, 8).requires_grad_()
    inputs = LossInput.of(texts, None, frozen={KEY: Embeddings(unit(5, 8, seed=4), None)})
    loss(inputs).backward()
    assert texts.grad[:, :4].abs().sum() > 0 and texts.grad[:, 4:].abs().sum() == 0


def test_relative_similarity_is_zero_when_the_student_keeps_the_order_by_the_margin():
    sim = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    assert relative_similarity(sim, sim, 0.0).item() == 0
    assert relative_similarity(sim, sim, 0.5).item() > 0


def test_jasper_bad_config():
    with pytest.raises(FieldError, match="all 0"):
        JasperConfig(kind="jasper", teacher=TEACHER, cosine_weight=0, similarity_weight=0, relative_weight=0)


# ---------------------------------------------------------------------------- single-text batches


def test_single_text_batches_train_embedding_terms_and_skip_pair_terms():
    from trainer.config import InfoNCEConfig

    configs = [
        InfoNCEConfig(kind="infonce"),
        EmbedDistillConfig(kind="embed_distill", teacher=TEACHER),
        JasperConfig(kind="jasper", teacher=TEACHER),
        DistillKLConfig(kind="distill_kl", teacher=TEACHER),
    ]
    loss_fn = build_loss(configs, context())
    assert not loss_fn.needs_pairs
    texts = unit(5, 8).float().requires_grad_()
    inputs = LossInput.of(texts, None, frozen={KEY: Embeddings(unit(5, 8, seed=4).float(), None)})
    total, parts = loss_fn(inputs)
    assert set(parts) == {"embed_distill_1", "jasper_2"}
    assert total.item() == pytest.approx(parts["embed_distill_1"].item() + parts["jasper_2"].item(), rel=1e-6)
    total.backward()
    assert texts.grad.abs().sum() > 0
    assert build_loss([InfoNCEConfig(kind="infonce")], context()).needs_pairs


def test_projection_per_matryoshka_width():
    from trainer.losses.matryoshka import MatryoshkaConfig

    config = MatryoshkaConfig(kind="matryoshka", dims=[8, 4], terms=[EmbedDistillConfig(kind="embed_distill", teacher=TEACHER)])
    loss = config.build(context(8, 8))
    maps = loss.terms[0].projection.maps
    assert list(maps) == ["4"] and maps["4"].in_features == 4 and maps["4"].out_features == 8  # width 8 matches the teacher
    value = loss(batch().map_tensors(lambda t: t.float()))
    value.backward()
    assert maps["4"].weight.grad.abs().sum() > 0
