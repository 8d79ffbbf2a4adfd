import pytest
import torch
import torch.nn.functional as F

from trainer.config import load_recipe
from trainer.errors import RunError
from trainer.losses import LossContext, LossInput, build_loss
from trainer.losses.gor import GORConfig
from trainer.losses.infonce import InfoNCEConfig
from trainer.losses.matryoshka import MatryoshkaConfig
from trainer.schema import FieldError

CONTEXT = LossContext(dim=16, normalized=True)


def unit(*shape, seed=0):
    torch.manual_seed(seed)
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def matryoshka(dims, terms, **options):
    return MatryoshkaConfig(kind="matryoshka", dims=dims, terms=terms, **options).build(CONTEXT)


def test_sums_the_inner_terms_over_renormalised_prefixes():
    q, p, n = unit(5, 16, seed=1), unit(5, 16, seed=2), unit(5, 1, 16, seed=3)
    inner = InfoNCEConfig(kind="infonce", temperature=0.05)
    gor = GORConfig(kind="gor", weight=0.5)
    loss = matryoshka([16, 8, 4], [inner, gor], weights=[1.0, 2.0, 3.0])
    expected = 0.0
    for dim, weight in [(16, 1.0), (8, 2.0), (4, 3.0)]:
        cut = lambda t: F.normalize(t[..., :dim], dim=-1)  # noqa: E731
        inputs = LossInput.of(cut(q), cut(p), cut(n))
        expected += weight * (inner.build(CONTEXT)(inputs) + 0.5 * gor.build(CONTEXT)(inputs))
    assert loss(LossInput.of(q, p, n)).item() == pytest.approx(expected.item(), abs=1e-10)


def test_equals_sentence_transformers_matryoshka():
    from sentence_transformers.sentence_transformer.losses import matryoshka as st

    q, p, n = unit(6, 16, seed=1), unit(6, 16, seed=2), unit(6, 1, 16, seed=3)
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]

    class Inner(torch.nn.Module):  # sentence-transformers' MNRL on precomputed, truncated embeddings
        def compute_loss_from_embeddings(self, embeddings, labels):
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

            return MultipleNegativesRankingLoss(None, scale=20.0).compute_loss_from_embeddings(embeddings, labels)

    expected = sum(
        w * Inner().compute_loss_from_embeddings([st.shrink(t, d) for t in (q, p, n[:, 0])], None)
        for d, w in zip(dims, weights)
    )
    ours = matryoshka(dims, [InfoNCEConfig(kind="infonce")], weights=weights)(LossInput.of(q, p, n))
    assert ours.item() == pytest.approx(expected.item(), abs=1e-10)


def test_dims_per_step_uses_a_subset():
    q, p = unit(4, 16, seed=1), unit(4, 16, seed=2)
    inner = InfoNCEConfig(kind="infonce")
    every = {d: matryoshka([d], [inner])(LossInput.of(q, p)).item() for d in (16, 8, 4)}
    loss = matryoshka([16, 8, 4], [inner], dims_per_step=1)
    seen = {round(loss(LossInput.of(q, p)).item(), 8) for _ in range(30)}
    assert seen == {round(v, 8) for v in every.values()}


def test_bad_dims():
    with pytest.raises(RunError, match=r"\[32\] are larger than the model's 16"):
        matryoshka([32, 8], [InfoNCEConfig(kind="infonce")])
    with pytest.raises(FieldError, match="one weight per entry"):
        MatryoshkaConfig(kind="matryoshka", dims=[16, 8], terms=[InfoNCEConfig(kind="infonce")], weights=[1.0])
    with pytest.raises(FieldError, match="twice"):
        MatryoshkaConfig(kind="matryoshka", dims=[8, 8], terms=[InfoNCEConfig(kind="infonce")])


def test_recipe_builds_nested_terms_and_names_bad_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "run_name: r\nmodel: {name_or_path: m}\ndata: {train: [{kind: pairs, path: x.jsonl}]}\n"
        "loss:\n  - kind: matryoshka\n    dims: [16, 8]\n    terms:\n      - kind: infonce\n        directions: [query_to_doc, doc_to_doc]\n"
    )
    recipe = load_recipe(path)
    assert recipe.loss[0].terms[0].directions == ["query_to_doc", "doc_to_doc"]
    assert build_loss(recipe.loss, CONTEXT).names == ["matryoshka"]
    from trainer.config import RecipeError

    with pytest.raises(RecipeError, match=r"'loss.0.terms.0.temprature': unknown key; did you mean 'temperature'"):
        load_recipe(path, ["loss.0.terms.0.temprature=0.1"])
    with pytest.raises(RecipeError, match=r"'loss.0.terms.0.kind': unknown kind 'infonse'; did you mean 'infonce'"):
        load_recipe(path, ["loss.0.terms.0.kind=infonse"])
