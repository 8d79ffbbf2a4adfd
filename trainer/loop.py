"""The training loop: setup, then one readable `train()`.

    setup_run -> build data, encoder, loss, optimiser, schedule -> prepare -> evaluate (start)
    -> for each step: encode, loss, backward, clip, step -> log / evaluate / checkpoint
    -> evaluate (end) -> final checkpoint
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from trainer.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import OptimizerConfig, Recipe, ScheduleConfig
from trainer.data.collate import Collator
from trainer.data.readers import read_training_data
from trainer.data.sampler import NoDuplicatesBatchSampler
from trainer.errors import Preempted, RunError
from trainer.evaluation.runner import EvalRunner
from trainer.losses import WeightedLoss, build_loss
from trainer.model.encoder import Encoder
from trainer.preemption import PreemptionWatch
from trainer.run_dir import check_run_dir, create_run_dir
from trainer.step import cached_step, plain_step


def build_optimizer(encoder: Encoder, config: OptimizerConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)  # biases and norms: no decay
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def build_schedule(optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int):
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.kind]
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_for(total_steps), num_training_steps=total_steps
    )


class MetricsLog:
    """Append-only metrics.jsonl in the run folder, plus Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, path: Path) -> None:
        self.accelerator = accelerator
        self.path = path

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)


def flat_config(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested recipe to dotted scalar keys, the form trackers accept as hyper-parameters."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                flat.update(flat_config(item, f"{name}.{i}.") if isinstance(item, dict) else {f"{name}.{i}": item})
        else:
            flat[name] = "null" if value is None else value
    return flat


def train(recipe: Recipe, resume: bool = False) -> dict[str, float]:
    """Train as the recipe says; returns the final evaluation metrics."""
    training = recipe.training
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        cpu=training.cpu,
        log_with=recipe.logging.report_to or None,
        step_scheduler_with_optimizer=False,
    )
    set_seed(recipe.seed)
    run_dir = check_run_dir(recipe, resume)

    # ---------------------------------------------------------------- data and model
    examples = read_training_data(recipe.data.train, recipe.data.num_negatives)
    create_run_dir(recipe, run_dir, accelerator)
    encoder = Encoder.from_config(recipe.model)
    sources = recipe.data.train
    sampler = NoDuplicatesBatchSampler(
        examples.keys,
        recipe.data.batch_size,
        seed=recipe.seed,
        shuffle=recipe.data.shuffle,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        weights=[s.weight for s in sources] if sources[0].weight is not None else None,
        homogeneous=recipe.data.batching == "homogeneous",
    )
    prompts = [
        (
            recipe.model.query_prompt if s.query_prompt is None else s.query_prompt,
            recipe.model.document_prompt if s.document_prompt is None else s.document_prompt,
        )
        for s in sources
    ]
    collator = Collator(encoder.tokenizer, recipe.model.max_seq_length, prompts)
    # its own generator: starting an epoch must not draw from the global RNG that dropout uses,
    # or a resumed run would diverge from an uninterrupted one
    loader = DataLoader(
        examples,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=recipe.data.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    if len(sampler) == 0:
        raise RunError(
            f"{len(examples)} training pairs give no batch of at least 2 distinct pairs per process; add data"
        )
    steps_per_epoch = math.ceil(len(sampler) / training.gradient_accumulation_steps)
    total_steps = training.max_steps or training.epochs * steps_per_epoch

    # ---------------------------------------------------------------- optimisation
    loss_fn = build_loss(recipe.loss)
    optimizer = build_optimizer(encoder, recipe.optimizer)
    scheduler = build_schedule(optimizer, recipe.schedule, total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        if training.grad_cache_chunk_size is not None:
            raise RunError(
                "training.grad_cache_chunk_size does not work with DeepSpeed, whose engine steps the "
                "optimiser on every backward pass; use DDP or FSDP (launch/accelerate/) for cached losses"
            )
        # batches come from our own sampler, so DeepSpeed cannot infer the micro-batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    evals = EvalRunner(recipe.evaluation, recipe, run_dir, recipe.checkpointing.save_best)
    metrics_log = MetricsLog(accelerator, run_dir / "metrics.jsonl")
    if recipe.logging.report_to:
        accelerator.init_trackers(recipe.logging.project, config=flat_config(asdict(recipe)))

    state = TrainState()
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise RunError(f"--resume: no checkpoint in {run_dir}")
        state = load_checkpoint(accelerator, checkpoint)
        accelerator.print(f"resumed from {checkpoint} (step {state.step}, epoch {state.epoch})")

    accelerator.print(
        f"{len(examples)} training pairs, {steps_per_epoch} steps per epoch, {total_steps} steps, "
        f"batch {recipe.data.batch_size} x {accelerator.num_processes} process(es), run folder {run_dir}"
    )
    if recipe.evaluation.at_start and state.step == 0 and recipe.evaluation.sets:
        metrics = evals.run(accelerator, encoder, cached=True)
        metrics_log.write(0, metrics)

    # ---------------------------------------------------------------- train
    encoder.train()
    cross_device = training.cross_device_negatives and accelerator.num_processes > 1
    progress = tqdm(
        total=total_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    started, pairs_timed = time.perf_counter(), 0
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0  # mean loss per logging interval
    metrics: dict[str, float] = {}
    preemption = PreemptionWatch()
    while state.step < total_steps:
        sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(encoder):
                if training.grad_cache_chunk_size is None:
                    loss, parts = plain_step(encoder, loss_fn, batch, accelerator.backward, cross_device)
                else:
                    loss, parts = cached_step(
                        encoder, loss_fn, batch, accelerator.backward, cross_device,
                        training.grad_cache_chunk_size, lambda: accelerator.no_sync(encoder),
                    )
                if accelerator.sync_gradients and training.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(encoder.parameters(), training.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            pairs_timed += batch.size * accelerator.num_processes
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            progress.update(1)

            if state.step % recipe.logging.log_every_steps == 0:
                # one host sync per logging interval, not per step
                pairs_per_s = pairs_timed / (time.perf_counter() - started)
                logged = {"loss": (loss_sum / loss_count).item(), "lr": scheduler.get_last_lr()[0], "pairs_per_s": pairs_per_s}
                if len(parts) > 1:
                    logged.update({f"loss/{k}": v.item() for k, v in parts.items()})
                loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
                metrics_log.write(state.step, logged)
                progress.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}", pairs_s=f"{pairs_per_s:.1f}")
            done = state.step >= total_steps
            every = recipe.evaluation.every_steps
            if every and state.step % every == 0 and not done and recipe.evaluation.sets:
                metrics = evals.run(accelerator, encoder)
                metrics_log.write(state.step, metrics)
                evals.update_best(accelerator, encoder, metrics, state)
                started, pairs_timed = time.perf_counter(), 0  # throughput counts training only
            every = recipe.checkpointing.every_steps
            if every and state.step % every == 0 and not done:
                save_checkpoint(accelerator, encoder, state, run_dir, recipe.checkpointing.keep_last)
                started, pairs_timed = time.perf_counter(), 0
            if done:
                break
            if preemption.should_stop(accelerator):
                saved = save_checkpoint(accelerator, encoder, state, run_dir, recipe.checkpointing.keep_last)
                progress.close()
                preemption.close()
                accelerator.end_training()
                raise Preempted(preemption.received or "a signal on another process", state.step, str(saved))
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    preemption.close()

    # ---------------------------------------------------------------- finish
    if recipe.evaluation.at_end and recipe.evaluation.sets:
        metrics = evals.run(accelerator, encoder)
        metrics_log.write(state.step, metrics)
        evals.update_best(accelerator, encoder, metrics, state)
    final = save_checkpoint(accelerator, encoder, state, run_dir, recipe.checkpointing.keep_last)
    accelerator.print(f"saved {final}")
    if state.best_step is not None:
        accelerator.print(f"best {recipe.evaluation.metric_for_best} {state.best_metric:.4f} at step {state.best_step}")
    accelerator.end_training()
    return metrics
