"""Evaluation during training: every set, at start, every N steps and at the end; keeps the
best model by the chosen metric."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from trainer.checkpoint import TrainState, save_best
from trainer.config import EvaluationConfig, Recipe
from trainer.errors import RunError
from trainer.evaluation import Evaluator, build_evaluator, evaluate_set
from trainer.evaluation.cache import EvalCache, cache_key
from trainer.evaluation.sharded import ShardedEncoder, forward_module
from trainer.model.embedding_cache import cached_text_encoder

T = TypeVar("T")


def _from_main(accelerator: Accelerator, value: T) -> T:
    """The main process's `value` on every process."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


class EvalRunner:
    """Evaluates on every process; keeps the best model by the chosen metric."""

    def __init__(self, config: EvaluationConfig, recipe: Recipe, run_dir: Path, save_best_model: bool) -> None:
        self.config = config
        self.recipe = recipe
        self.run_dir = run_dir
        self.save_best_model = save_best_model and config.metric_for_best is not None
        self.evaluators: dict[str, Evaluator] = {s.name: build_evaluator(s) for s in config.sets}
        self.cache = EvalCache(Path(recipe.checkpointing.output_dir) / ".eval_cache")

    def run(self, accelerator: Accelerator, encoder: torch.nn.Module, *, cached: bool = False) -> dict[str, float]:
        """Every set's metrics, the same on every process; all processes must call it.

        `encoder` is the prepared model. Each process embeds a share of the texts (so that sharded
        parameters take part in every forward pass); the main process gathers and scores them and
        sends its numbers to all. With `cached`, the main process looks the values
        up and tells the others, so that all skip, or all run, each set."""
        unwrapped = accelerator.unwrap_model(encoder)
        text_encoder = ShardedEncoder(accelerator, unwrapped, forward_module(encoder))
        if cached and accelerator.num_processes == 1:  # the model as loaded: its embeddings may be known
            text_encoder = cached_text_encoder(
                text_encoder, self.recipe.model, accelerator.device.type, str(accelerator.mixed_precision)
            )
        metrics: dict[str, float] = {}
        for eval_set in self.config.sets:
            key, values = None, None
            if cached and accelerator.is_main_process:
                key = cache_key(
                    self.recipe.model, eval_set, self.config.dims, accelerator.device.type, str(accelerator.mixed_precision)
                )
                values = self.cache.get(key)
            values = _from_main(accelerator, values)
            if values is None:
                evaluator = self.evaluators[eval_set.name]
                values = evaluate_set(evaluator, text_encoder, self.config.dims, self.recipe.model.normalize)
                values = _from_main(accelerator, values)
                if accelerator.is_main_process:
                    self.cache.put(key, values)
            metrics.update({f"{eval_set.name}/{k}": v for k, v in values.items()})
        if accelerator.is_main_process and metrics:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"eval: {shown}")
        return metrics

    def update_best(
        self, accelerator: Accelerator, encoder: torch.nn.Module, metrics: dict[str, float], state: TrainState,
        loss_fn: torch.nn.Module | None = None,
    ):
        name = self.config.metric_for_best
        if name is None:
            return
        if name not in metrics:
            raise RunError(f"evaluation.metric_for_best {name!r} is not among the metrics {sorted(metrics)}")
        value = metrics[name]
        better = state.best_metric is None or (
            value > state.best_metric if self.config.greater_is_better else value < state.best_metric
        )
        if better:
            state.best_metric, state.best_step = value, state.step
            if self.save_best_model:
                full_state = accelerator.get_state_dict(encoder)  # collective when parameters are sharded
                loss_state = None
                if loss_fn is not None and any(True for _ in loss_fn.parameters()):  # a learned projection, temperature
                    loss_state = accelerator.unwrap_model(loss_fn).state_dict()
                if accelerator.is_main_process:
                    save_best(accelerator.unwrap_model(encoder), full_state, self.run_dir, metrics, state.step, loss_state)
                accelerator.wait_for_everyone()
