"""The exported folder's README.md: Hub metadata, usage, the recipe as run, results and a plot.

Everything comes from the run folder (`recipe.yaml`, `metrics.jsonl`) next to the checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config import DIM_SUFFIX, dim_suffix
from trainer.run_dir import read_metrics

PLOT_FILE = "training_curves.png"
STUDENT_FILE = "student.json"
"""Written by `prep student` into the folder it makes: the model and the layers it kept."""


@dataclass
class RunRecord:
    recipe: dict | None = None
    recipe_text: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    """Rows of metrics.jsonl that hold evaluation results, in order."""


def read_run(run_dir: Path | None) -> RunRecord:
    """What the card shows of the run. The export is done when this runs, so a damaged recipe.yaml
    or metrics.jsonl leaves its part out of the card with a warning instead of failing."""
    record = RunRecord()
    if run_dir is None:
        return record
    recipe_file = run_dir / "recipe.yaml"
    if recipe_file.exists():
        try:
            text = recipe_file.read_text(encoding="utf-8")
            recipe = yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8
            _warn(f"{recipe_file}: not read ({type(exc).__name__}); the card leaves the recipe out")
        else:
            if isinstance(recipe, dict) and all(isinstance(recipe.get(k, {}), dict) for k in ("model", "data", "training")):
                record.recipe, record.recipe_text = recipe, text
            else:
                _warn(f"{recipe_file}: not a recipe; the card leaves it out")
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        try:
            rows, skipped = read_metrics(metrics_file)  # skipped: e.g. a line cut short when a run was killed
        except (OSError, ValueError) as exc:
            _warn(f"{metrics_file}: not read ({type(exc).__name__}); the card leaves the curves out")
            rows, skipped = [], 0
        for row in rows:
            if isinstance(row.get("loss"), (int, float)):
                record.losses.append((row["step"], row["loss"]))
            elif any("/" in key for key in row) and all(isinstance(v, (int, float)) for v in row.values()):
                record.evaluations.append(row)
        if skipped:
            _warn(f"{metrics_file}: {skipped} unreadable line(s) left out of the card")
    return record


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def plot_curves(record: RunRecord, out: Path) -> bool:
    """Training loss and every evaluation metric against the step; False when there is nothing to plot."""
    if not record.losses and not record.evaluations:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if record.losses:
        steps, values = zip(*sorted(dict(record.losses).items()))  # a resumed run logs some steps twice
        loss_axis.plot(steps, values, color="tab:blue")
    loss_axis.set(title="training loss", xlabel="step", ylabel="loss")
    names = sorted({k for row in record.evaluations for k in row if k != "step"})
    for name in names:
        points = sorted({row["step"]: row[name] for row in record.evaluations if name in row}.items())
        eval_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    eval_axis.set(title="evaluation", xlabel="step")
    if names:
        eval_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def _hub_id(name: str) -> str | None:
    """A base model name fit for the `base_model` field: a Hub id, not a local path."""
    if name.startswith(("package:", "/", ".", "~")) or Path(name).exists() or name.count("/") != 1:
        return None
    return name


def _base_description(model: dict) -> tuple[str | None, str]:
    """The Hub id for `base_model` (when there is one) and the words the card uses for the model
    the run started from: a student cut from a teacher (by `model.layers` or by `prep student`)
    is named after the teacher and its kept layers, not after a local folder."""
    name = str(model.get("name_or_path") or "")
    if not name:
        return None, "an unknown base model"
    layers = model.get("layers") or (list(range(model["num_layers"])) if model.get("num_layers") else None)
    source = name
    student_file = Path(name) / STUDENT_FILE
    if not layers and student_file.is_file():
        try:
            made = json.loads(student_file.read_text(encoding="utf-8"))
            source, layers = str(made["from"]), list(made["layers"])
        except (OSError, ValueError, KeyError, TypeError):
            _warn(f"{student_file}: not read; the card names the folder as the base model")
    if layers:
        kept = ", ".join(str(layer) for layer in layers)
        return _hub_id(source), f"a student of `{source}` ({len(layers)} of its layers: {kept})"
    return _hub_id(source), f"`{source}`"


def _model_index(name: str, evaluation: dict) -> list[dict]:
    by_set: dict[str, list[dict]] = {}
    for key, value in evaluation.items():
        if "/" not in key:
            continue
        set_name, metric = key.split("/", 1)
        by_set.setdefault(set_name, []).append({"type": metric.replace("@", "_at_"), "value": round(value, 4)})
    results = []
    for set_name, metrics in by_set.items():
        task = "sentence-similarity" if any(m["type"] == "spearman" for m in metrics) else "retrieval"
        results.append({"task": {"type": task}, "dataset": {"name": set_name, "type": set_name}, "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def served_metrics(evaluation: dict, cut_dim: int | None) -> dict:
    """The metrics of the model as exported: at `cut_dim` (their `@dim<N>` names, the suffix
    dropped) when the export is cut to that size, else the full-size ones; never other sizes."""
    full = {k: v for k, v in evaluation.items() if k != "step" and DIM_SUFFIX not in k}
    if cut_dim is None:
        return full
    suffix = dim_suffix(cut_dim)
    return {k[: -len(suffix)]: v for k, v in evaluation.items() if k.endswith(suffix)}


def describe_term(term: dict) -> str:
    """One loss term of the recipe as run, with the options it was given and its inner terms."""
    options = []
    for key, value in term.items():
        if key in ("kind", "terms", "weight") or value in (None, False, [], {}, "none"):
            continue
        if isinstance(value, dict):  # a teacher or a guide
            value = value.get("name_or_path", value)
        options.append(f"{key} {value}")
    text = term.get("kind", "?") + (f" ({', '.join(options)})" if options else "")
    if term.get("weight") not in (None, 1.0, 1):
        text = f"{term['weight']} x {text}"
    if term.get("terms"):
        text += " of [" + "; ".join(describe_term(inner) for inner in term["terms"]) + "]"
    return text


def describe_lora(lora: dict, keep_adapter: bool) -> str:
    targets = ", ".join(lora.get("target_modules") or []) or "every linear layer"
    text = f"LoRA: rank {lora.get('rank')}, alpha {lora.get('alpha')}, on {targets}"
    if lora.get("trainable_modules"):
        text += f", with {', '.join(lora['trainable_modules'])} trained in full"
    return text + ("; this folder holds the adapter (loads with peft)" if keep_adapter else "; merged into the base weights")


def write_model_card(
    folder: Path,
    *,
    name: str,
    run_dir: Path | None,
    dimension: int,
    cut_dim: int | None = None,
    cut_layers: int | None = None,
    similarity: str,
    prompts: dict[str, str],
    language: list[str] | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    step: int | None = None,
    keep_adapter: bool = False,
) -> Path:
    """`step`: the step of the exported checkpoint; the card shows that step's evaluation (the
    last one up to it when the checkpoint was not evaluated) and says how many steps it trained."""
    record = read_run(run_dir)
    recipe = record.recipe or {}
    has_plot = plot_curves(record, folder / PLOT_FILE)
    upto = [row for row in record.evaluations if step is None or row["step"] <= step]
    final = upto[-1] if upto else {}
    first = record.evaluations[0] if record.evaluations else {}
    if step is None:
        step = max([s for s, _ in record.losses] + [row["step"] for row in record.evaluations], default=None)

    metadata: dict = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "embtrain"],
    }
    hub_base, base_text = _base_description(recipe.get("model", {}))
    base = base_model or hub_base
    if base:
        metadata["base_model"] = base
    if datasets:
        metadata["datasets"] = datasets
    if language:
        metadata["language"] = language
    if license:
        metadata["license"] = license
    # the headline scores are the exported model's own: at its cut size, and none for a model cut
    # to fewer layers than the run evaluated
    served = {} if cut_layers is not None else served_metrics(final, cut_dim)
    model_index = _model_index(name, served)
    if model_index:
        metadata["model-index"] = model_index

    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    if base_model:
        base_text = f"`{base_model}`"
    lines += [
        f"A text-embedding model ({dimension} dimensions, {similarity} similarity) fine-tuned from "
        f"{base_text} with embtrain.",
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{name}")',
    ]
    if "query" in prompts or "document" in prompts:
        lines += [
            'queries = model.encode(["how do plants make energy?"], prompt_name="query")' if "query" in prompts
            else 'queries = model.encode(["how do plants make energy?"])',
            'documents = model.encode(["Photosynthesis turns light into chemical energy."], prompt_name="document")'
            if "document" in prompts else 'documents = model.encode(["Photosynthesis turns light into chemical energy."])',
        ]
    else:
        lines += [
            'queries = model.encode(["how do plants make energy?"])',
            'documents = model.encode(["Photosynthesis turns light into chemical energy."])',
        ]
    lines += ["print(model.similarity(queries, documents))", "```", ""]
    if prompts:
        lines += ["Prompts: " + ", ".join(f"{k}: `{v!r}`" for k, v in prompts.items()), ""]

    if final:
        lines += ["## Evaluation", "", "| metric | before training | after training |", "|---|---:|---:|"]
        for key in sorted(k for k in final if k != "step"):
            before = f"{first[key]:.4f}" if first is not final and key in first and first.get("step") == 0 else ""
            lines.append(f"| {key} | {before} | {final[key]:.4f} |")
        lines += ["", f"At step {final.get('step')}; retrieval uses exact search."]
        if cut_layers is not None:
            lines.append(
                f"This model is cut to its first {cut_layers} layers, which the run did not evaluate: these are "
                "the full model's scores. `embtrain eval` on this folder gives its own."
            )
        elif cut_dim is not None:
            lines.append(
                f"This model is cut to {cut_dim} dimensions: its scores are the `{dim_suffix(cut_dim)}` rows."
                if served else f"This model is cut to {cut_dim} dimensions, at which the run did not evaluate: "
                "these are other sizes' scores. `embtrain eval` on this folder gives its own."
            )
        lines.append("")
    if has_plot:
        lines += ["## Training curves", "", f"![training loss and evaluation]({PLOT_FILE})", ""]
    if recipe:
        data = recipe.get("data", {})
        sources = ", ".join(f"{s.get('kind')} `{s.get('path')}`" for s in data.get("train", []))
        if any(s.get("kind") != "texts" for s in data.get("train", [])):
            negatives = data.get("num_negatives")
            sources += "; hard negatives per query: " + (str(negatives) if negatives is not None else "as in the data")
        losses = " + ".join(describe_term(term) for term in recipe.get("loss", []))
        training = recipe.get("training", {})
        lines += [
            "## Training",
            "",
            f"- Data: {sources}; batch size {data.get('batch_size')}",
            f"- Loss: {losses}",
            *([f"- {describe_lora(recipe['model']['lora'], keep_adapter)}"] if recipe.get("model", {}).get("lora") else []),
            f"- Optimiser: {recipe.get('optimizer', {}).get('kind')} lr {recipe.get('optimizer', {}).get('lr')}, "
            f"schedule {recipe.get('schedule', {}).get('kind')}; "
            + (f"{training.get('max_steps')} steps" if training.get("max_steps") else f"{training.get('epochs')} epochs"),
            f"- Steps trained: {step if step is not None else 'unknown'}",
            "",
            "<details><summary>Recipe as run</summary>",
            "",
            "```yaml",
            record.recipe_text.rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path
