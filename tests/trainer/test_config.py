from pathlib import Path

import pytest

from trainer.config import InfoNCEConfig, PairsSource, RetrievalEvalConfig, load_recipe, parse_overrides

BASE = """\
run_name: t
model:
  name_or_path: some/model
data:
  train:
    - kind: pairs
      path: pairs.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.model.pooling == "mean"
    assert recipe.data.batch_size == 32
    assert isinstance(recipe.data.train[0], PairsSource)
    assert recipe.loss == [InfoNCEConfig(kind="infonce", weight=1.0, temperature=0.05)]


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, BASE + "training:\n  max_stpes: 3\n")
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert "'training.max_stpes'" in message
    assert "did you mean 'max_steps'" in message


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ValueError, match="'optimiser': unknown key; did you mean 'optimizer'"):
        load_recipe(write(tmp_path, BASE + "optimiser:\n  lr: 1e-4\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"'data.batch_size': expected int, got str 'big'"):
        load_recipe(write(tmp_path, BASE + "  batch_size: big\n"))


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ValueError, match="'training.epochs': expected int, got bool"):
        load_recipe(write(tmp_path, BASE + "training:\n  epochs: true\n"))


def test_missing_required_field(tmp_path):
    with pytest.raises(ValueError, match="'model.name_or_path': required key is missing"):
        load_recipe(write(tmp_path, BASE.replace("  name_or_path: some/model\n", "  pooling: cls\n")))


def test_bad_literal_suggests(tmp_path):
    with pytest.raises(ValueError, match="'model.pooling': 'meen' is not one of .*did you mean 'mean'"):
        load_recipe(write(tmp_path, BASE.replace("some/model\n", "some/model\n  pooling: meen\n")))


def test_unknown_kind_suggests(tmp_path):
    with pytest.raises(ValueError, match="'data.train.0.kind': unknown kind 'pair'; did you mean 'pairs'"):
        load_recipe(write(tmp_path, BASE.replace("kind: pairs", "kind: pair")))


def test_kind_specific_options_are_strict(tmp_path):
    # split belongs to beir sources, not to pairs sources
    with pytest.raises(ValueError, match="'data.train.0.split': unknown key"):
        load_recipe(write(tmp_path, BASE + "      split: train\n"))


def test_post_init_checks_are_reported_with_the_section(tmp_path):
    with pytest.raises(ValueError, match="'loss.0': temperature must be > 0"):
        load_recipe(write(tmp_path, BASE + "loss:\n  - kind: infonce\n    temperature: 0\n"))


def test_overrides_set_nested_values_and_are_typed(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["training.max_steps=7", "optimizer.lr=1e-4", "data.train.0.path=other.csv"])
    assert recipe.training.max_steps == 7
    assert recipe.optimizer.lr == pytest.approx(1e-4)
    assert recipe.data.train[0].path == "other.csv"


def test_override_typo_is_reported_as_override(tmp_path):
    with pytest.raises(ValueError, match=r"\(command-line override\): 'model.polling'.*did you mean 'pooling'"):
        load_recipe(write(tmp_path, BASE), ["model.polling=cls"])


def test_override_needs_equals():
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_overrides(["training.max_steps"])


def test_metric_for_best_must_name_a_set(tmp_path):
    text = BASE + (
        "evaluation:\n  sets:\n    - kind: retrieval\n      name: sf\n      path: x\n"
        "  metric_for_best: scifact/ndcg@10\n"
    )
    with pytest.raises(ValueError, match="metric_for_best"):
        load_recipe(write(tmp_path, text))
    recipe = load_recipe(write(tmp_path, text.replace("scifact/", "sf/")))
    assert isinstance(recipe.evaluation.sets[0], RetrievalEvalConfig)


def test_invalid_yaml_names_file(tmp_path):
    with pytest.raises(ValueError, match="invalid YAML"):
        load_recipe(write(tmp_path, "run_name: [unclosed\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_metric_for_best_names_a_known_metric(tmp_path):
    text = BASE + (
        "evaluation:\n  sets:\n    - kind: retrieval\n      name: sf\n      path: x\n"
        "  metric_for_best: sf/ndcg10\n"
    )
    with pytest.raises(ValueError, match="did you mean 'sf/ndcg@10'"):
        load_recipe(write(tmp_path, text))


def test_weights_on_all_sources_or_none(tmp_path):
    two = BASE + "    - kind: pairs\n      path: other.jsonl\n"
    with pytest.raises(ValueError, match="weight on every training source or on none"):
        load_recipe(write(tmp_path, two.replace("path: pairs.jsonl", "path: pairs.jsonl\n      weight: 2")))
    with pytest.raises(ValueError, match="weights must be > 0"):
        load_recipe(write(tmp_path, BASE + "      weight: 0\n"))
    recipe = load_recipe(write(tmp_path, two + "  batching: mixed\n"))
    assert recipe.data.batching == "mixed" and len(recipe.data.train) == 2
