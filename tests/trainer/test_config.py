import math
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    InfoNCEConfig,
    OptimizerConfig,
    PairsSource,
    RetrievalEvalConfig,
    TrainingConfig,
    load_recipe,
    parse_overrides,
)
from trainer.schema import RecipeError, set_by_path

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


def test_an_unquoted_no_is_the_choice_no_not_a_boolean(tmp_path):
    # YAML reads `no` as false; the choice spelled "no" is what the user meant, in the file and in an override
    assert load_recipe(write(tmp_path, BASE + "training:\n  mixed_precision: no\n")).training.mixed_precision == "no"
    recipe = load_recipe(write(tmp_path, BASE), ["training.mixed_precision=no"])
    assert recipe.training.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"'model.pooling': yes/on/true \(read by YAML as True\) is not one of"):
        load_recipe(write(tmp_path, BASE.replace("some/model\n", "some/model\n  pooling: yes\n")))
    assert load_recipe(write(tmp_path, BASE), ["training.packing=off"]).training.packing == "off"  # off: a boolean too


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


def test_post_init_checks_are_reported_with_the_field(tmp_path):
    with pytest.raises(ValueError, match="'loss.0.temperature': must be > 0"):
        load_recipe(write(tmp_path, BASE + "loss:\n  - kind: infonce\n    temperature: 0\n"))


def test_packing_always_needs_sorted_sub_batches(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ValueError, match="'training.packing': packs length-sorted sub-batches: set sort_by_length: true"):
        load_recipe(path, ["training.packing=always", "training.sort_by_length=false"])
    assert load_recipe(path, ["training.sort_by_length=false"]).training.packing == "auto"  # auto: then off


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
    with pytest.raises(ValueError, match="'data.train.0.weight': must be > 0"):
        load_recipe(write(tmp_path, BASE + "      weight: 0\n"))
    recipe = load_recipe(write(tmp_path, two + "  batching: mixed\n"))
    assert recipe.data.batching == "mixed" and len(recipe.data.train) == 2


# ----------------------------------------------------------------------------- value checks

# A recipe with a loss list and both kinds of evaluation set, so that every checked key exists.
FULL = BASE + """\
loss:
  - kind: infonce
optimizer:
  betas: [0.9, 0.999]
evaluation:
  sets:
    - kind: retrieval
      name: r
      path: beir
    - kind: sts
      name: s
      path: sts.tsv
"""


def write_with(tmp_path: Path, dotted: str, value) -> Path:
    """FULL with `dotted` set to `value`, written as YAML (NaN and infinity as .nan, .inf)."""
    data = yaml.safe_load(FULL)
    set_by_path(data, dotted, value)
    return write(tmp_path, yaml.safe_dump(data))


FLOAT_KEYS = [
    "loss.0.temperature",
    "loss.0.weight",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.betas.0",
    "optimizer.eps",
    "schedule.warmup_ratio",
    "training.max_grad_norm",
    "data.train.0.weight",
]
NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity", "1e400", 10**400]


@pytest.mark.parametrize("value", NON_FINITE, ids=lambda v: repr(v)[:12])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_rejected(tmp_path, key, value):
    path = write_with(tmp_path, key, value)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}: '{key}': must be a finite number" in message


def test_non_finite_yaml_literals_are_rejected(tmp_path):
    for literal in (".nan", ".NaN", ".inf", "-.inf", "+.inf"):
        path = write(tmp_path, BASE + f"optimizer:\n  lr: {literal}\n")
        with pytest.raises(RecipeError, match=r"'optimizer.lr': must be a finite number"):
            load_recipe(path)


def test_non_finite_override_is_named_as_override(tmp_path):
    for value in (".nan", "inf", "-.inf"):
        with pytest.raises(RecipeError, match=r"\(command-line override\): 'loss.0.temperature': must be a finite"):
            load_recipe(write(tmp_path, BASE + "loss:\n  - kind: infonce\n"), [f"loss.0.temperature={value}"])


BAD_VALUES = [
    # (key to set, value, key named in the error, part of the message)
    ("training.max_grad_norm", 0, "training.max_grad_norm", "must be > 0 or null"),
    ("training.max_grad_norm", -1.0, "training.max_grad_norm", "must be > 0 or null"),
    ("training.nonfinite", "ignore", "training.nonfinite", "is not one of ['skip', 'stop']"),
    ("training.nonfinite_max_consecutive", 0, "training.nonfinite_max_consecutive", "must be >= 1"),
    ("training.epochs", 0, "training.epochs", "must be >= 1"),
    ("training.max_steps", 0, "training.max_steps", "must be >= 1"),
    ("training.gradient_accumulation_steps", 0, "training.gradient_accumulation_steps", "must be >= 1"),
    ("training.grad_cache_chunk_size", 0, "training.grad_cache_chunk_size", "must be >= 1"),
    ("optimizer.lr", 0, "optimizer.lr", "must be > 0"),
    ("optimizer.lr", -1e-5, "optimizer.lr", "must be > 0"),
    ("optimizer.weight_decay", -0.01, "optimizer.weight_decay", "must be >= 0"),
    ("optimizer.eps", 0, "optimizer.eps", "must be > 0"),
    ("optimizer.eps", -1e-8, "optimizer.eps", "must be > 0"),
    ("optimizer.betas", [1.0, 0.999], "optimizer.betas.0", "must be in [0, 1)"),
    ("optimizer.betas", [0.9, -0.1], "optimizer.betas.1", "must be in [0, 1)"),
    ("optimizer.betas", [0.9, 1.5], "optimizer.betas.1", "must be in [0, 1)"),
    ("optimizer.betas", [0.9], "optimizer.betas", "must have two values"),
    ("schedule.warmup_steps", -1, "schedule.warmup_steps", "must be >= 0"),
    ("schedule.warmup_ratio", 1.0, "schedule.warmup_ratio", "must be in [0, 1)"),
    ("logging.log_every_steps", 0, "logging.log_every_steps", "must be >= 1"),
    ("logging.log_every_steps", -5, "logging.log_every_steps", "must be >= 1"),
    ("evaluation.every_steps", 0, "evaluation.every_steps", "must be >= 1 or null"),
    ("evaluation.every_steps", -1, "evaluation.every_steps", "must be >= 1 or null"),
    ("checkpointing.every_steps", 0, "checkpointing.every_steps", "must be >= 1 or null"),
    ("checkpointing.every_steps", -10, "checkpointing.every_steps", "must be >= 1 or null"),
    ("checkpointing.keep_last", 0, "checkpointing.keep_last", "must be >= 1 or null"),
    ("data.num_workers", -1, "data.num_workers", "must be >= 0"),
    ("data.batch_size", 1, "data.batch_size", "must be >= 2"),
    ("data.num_negatives", -1, "data.num_negatives", "must be >= 0"),
    ("data.train.0.max_examples", 0, "data.train.0.max_examples", "must be >= 1"),
    ("data.train.0.weight", -1, "data.train.0.weight", "must be > 0"),
    ("data.train", [], "data.train", "needs at least one source"),
    ("evaluation.sets.0.batch_size", 0, "evaluation.sets.0.batch_size", "must be >= 1"),
    ("evaluation.sets.0.max_queries", 0, "evaluation.sets.0.max_queries", "must be >= 1"),
    ("evaluation.sets.1.batch_size", 0, "evaluation.sets.1.batch_size", "must be >= 1"),
    ("evaluation.sets.1.name", "r", "evaluation.sets", "names must be unique"),
    ("model.max_seq_length", 0, "model.max_seq_length", "must be >= 1"),
    ("loss.0.temperature", 0, "loss.0.temperature", "must be > 0"),
    ("loss", [], "loss", "needs at least one term"),
]


@pytest.mark.parametrize("key,value,named,message", BAD_VALUES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_bad_value_names_its_key_and_file(tmp_path, key, value, named, message):
    path = write_with(tmp_path, key, value)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}: '{named}': " in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,named",
    [
        ("training.max_grad_norm=0", "training.max_grad_norm"),
        ("optimizer.betas=[0.9, 1]", "optimizer.betas.1"),
        ("logging.log_every_steps=0", "logging.log_every_steps"),
        ("evaluation.sets.0.max_queries=0", "evaluation.sets.0.max_queries"),
    ],
)
def test_bad_override_is_named_as_override(tmp_path, override, named):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, FULL), [override])
    assert f"(command-line override): '{named}': " in str(err.value)


GOOD_BOUNDARIES = [
    ("training.max_grad_norm", None),
    ("training.max_grad_norm", 1e-6),
    ("training.nonfinite", "stop"),
    ("training.nonfinite", "skip"),
    ("training.nonfinite_max_consecutive", 1),
    ("optimizer.lr", "1e-5"),
    ("optimizer.weight_decay", 0),
    ("optimizer.eps", 1e-12),
    ("optimizer.betas", [0, 0.999999]),
    ("schedule.warmup_steps", 0),
    ("schedule.warmup_ratio", 0),
    ("logging.log_every_steps", 1),
    ("evaluation.every_steps", 1),
    ("evaluation.every_steps", None),
    ("checkpointing.every_steps", 1),
    ("checkpointing.every_steps", None),
    ("data.num_workers", 0),
    ("data.num_negatives", 0),
    ("data.train.0.max_examples", 1),
    ("data.train.0.max_examples", None),
    ("evaluation.sets.0.batch_size", 1),
    ("evaluation.sets.0.max_queries", 1),
    ("evaluation.sets.0.max_queries", None),
    ("evaluation.sets.1.batch_size", 1),
    ("run_name", "a"),
    ("run_name", "7"),
    ("run_name", "scifact-e5_base.v2"),
    ("run_name", "x..y"),
    ("run_name", "a" * 100),
]


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize("key,value", GOOD_BOUNDARIES, ids=lambda v: repr(v)[:30])
def test_boundary_value_is_accepted(tmp_path, key, value):
    recipe = load_recipe(write_with(tmp_path, key, value))
    got = _get(recipe, key)
    expected = float(value) if isinstance(value, str) and key == "optimizer.lr" else value
    assert got == expected


def test_nonfinite_defaults():
    training = TrainingConfig()
    assert (training.nonfinite, training.nonfinite_max_consecutive) == ("skip", 10)


BAD_RUN_NAMES = [
    ("", "is not a folder name"),
    (".", "is not a folder name"),
    ("..", "is not a folder name"),
    ("../../x", "path separator"),
    ("/abs", "path separator"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("run name", "contains ' '"),
    ("run:1", "contains ':'"),
    ("what?*", "contains '*', '?'"),
    ("résumé", "contains 'é'"),
    ("tab\there", "contains '\\t'"),
    (".hidden", "does not start with a letter or digit"),
    ("-x", "does not start with a letter or digit"),
    ("run.", "ends in '.'"),
    ("a" * 101, "has 101 characters"),
    ("con", "reserved device name"),
    ("NUL.txt", "reserved device name"),
    ("lpt1", "reserved device name"),
]


@pytest.mark.parametrize("name,problem", BAD_RUN_NAMES, ids=lambda v: repr(v)[:20])
def test_unsafe_run_name_is_rejected_with_the_rule(tmp_path, name, problem):
    path = write_with(tmp_path, "run_name", name)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}: 'run_name': {name!r} " in message
    assert problem in message
    assert "use letters, digits, '.', '_' and '-'" in message


def test_run_name_override_escaping_output_dir_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"\(command-line override\): 'run_name': '\.\./x' contains a path separator"):
        load_recipe(write(tmp_path, BASE), ["run_name=../x"])


def test_checks_also_apply_when_sections_are_built_in_code():
    with pytest.raises(ValueError, match="max_grad_norm must be > 0 or null"):
        TrainingConfig(max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"betas.1 must be in \[0, 1\)"):
        OptimizerConfig(betas=[0.9, 1.0])
    with pytest.raises(ValueError, match="max_examples must be >= 1"):
        PairsSource(kind="pairs", path="x", max_examples=0)


def test_every_registered_kind_has_its_implementation():
    from trainer.config import EvalSetConfig, SourceOptions
    from trainer.data.readers import READERS
    from trainer.evaluation import EVALUATORS
    from trainer.losses import LossConfig

    assert set(SourceOptions.registry) == set(READERS) == {"pairs", "beir", "texts"}
    assert set(EvalSetConfig.registry) == set(EVALUATORS) == {"retrieval", "sts"}
    assert {"infonce", "matryoshka", "adaptive_layers", "gor"} <= set(LossConfig.registry)
