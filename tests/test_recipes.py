"""Every recipe in the repo starts with the command that runs it, and validates."""

from pathlib import Path

import pytest

from trainer.cli import check_paths
from trainer.config import load_recipe, recipe_to_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


def before_commands(path: Path) -> list[list[str]]:
    """The recipe's `# Before: embtrain ...` commands (a trailing backslash continues a line)."""
    import shlex

    commands, current = [], None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if current is None and text.startswith("Before:"):
            current = text.removeprefix("Before:").strip()
        elif current is not None:
            current += " " + text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(shlex.split(current))
            current = None
    return commands


def prepared_outputs(path: Path) -> list[str]:
    """Files made by the recipe's `# Before:` commands (their --out), which may not exist yet."""
    return [c[c.index("--out") + 1] for c in before_commands(path) if "--out" in c]


def name(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


@pytest.mark.parametrize("path", RECIPES, ids=name)
def test_recipe_validates(path, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# Run: embtrain train recipes/{name(path)}"), first
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    made_before = prepared_outputs(path)
    if recipe.model.name_or_path.startswith(recipe.checkpointing.output_dir + "/"):
        made_before.append(recipe.model.name_or_path)  # a later stage starts from an earlier stage's run
    missing = [m for m in check_paths(recipe) if not any(f"{out} not found" in m for out in made_before)]
    assert missing == []


@pytest.mark.parametrize("path", RECIPES, ids=name)
def test_resolved_recipe_validates_and_round_trips(path, tmp_path, monkeypatch):
    """The resolved recipe saved with a run (every default written out) passes the same checks."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(recipe_to_yaml(recipe))
    assert load_recipe(resolved) == recipe
