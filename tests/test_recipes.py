"""Every recipe in the repo starts with the command that runs it, and validates."""

from pathlib import Path

import pytest

from trainer.cli import check_paths
from trainer.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: embtrain train recipes/" + path.name), first
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert check_paths(recipe) == []
