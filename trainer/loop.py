"""The training loop: setup, then one readable `train()`.

    setup_run -> build data, encoder, loss, optimiser, schedule -> prepare -> evaluate (start)
    -> for each step: encode, loss, backward, clip, step -> log / evaluate / checkpoint
    -> evaluate (end) -> final checkpoint
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from trainer.checkpoint import (
    RunShape,
    TrainState,
    find_resume_point,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from trainer.config import OptimizerConfig, Recipe, ScheduleConfig, TrainingConfig
from trainer.data.collate import Collator, ContrastiveBatch, PairTexts, TextTokenizer
from trainer.data import clusters
from trainer.data.readers import read_training_data
from trainer.data.refresh import NegativeRefresher
from trainer.data.sampler import NoDuplicatesBatchSampler
from trainer.data.training_set import TrainingSet
from trainer.errors import Preempted, RunError
from trainer.evaluation.runner import EvalRunner
from trainer.evaluation.sharded import forward_module
from trainer.losses import LossContext, WeightedLoss, build_loss
from trainer.model.encoder import Encoder
from trainer.model.cross_encoder import CrossEncoderScorer
from trainer.model.embedding_cache import CachedEncoder, EmbeddingCache
from trainer.model.frozen import cache_identity, cache_name, frozen_key, load_frozen
from trainer.model.lora import describe_parameters, is_lora, keep_trainable_in_checkpoints
from trainer.model.sub_batches import Packing, SubBatcher, attention_cost
from trainer import precision
from trainer.allocator import configure_allocator, release_free_memory
from trainer.preemption import PreemptionWatch
from trainer.progress import progress_bar
from trainer.run_dir import (
    METRICS_FILE,
    check_run_dir,
    create_run_dir,
    record_changes,
    truncate_metrics,
)
from trainer.run_dir import flat_config as flat_recipe
from trainer.run_summary import (
    SUMMARY_FILE,
    RunClock,
    end_summary,
    peak_memory,
    running_summary,
    summary_table,
    write_plots,
    write_summary,
)
from trainer import trackers
from trainer.step import cached_step, plain_step

GPU_LOADER_WORKERS = 2
"""DataLoader workers when training on a GPU and `data.num_workers` is null."""


def build_optimizer(
    encoder: Encoder, config: OptimizerConfig, extra: list[torch.nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """AdamW over the encoder's trainable parameters and `extra` ones (the loss's)."""
    decay, no_decay = [], []
    for param in [p for p in encoder.parameters() if p.requires_grad] + list(extra or []):
        (no_decay if param.ndim < 2 else decay).append(param)  # biases, norms, temperatures: no decay
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step, and it skips a step flagged non-finite on the device (NonFiniteGuard)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=True)


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
        self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)


def flat_config(tree: dict) -> dict[str, str | int | float | bool]:
    """Nested recipe to dotted scalar keys, the form trackers accept as hyper-parameters."""
    return {k: "null" if v is None else ("[]" if v == [] else v) for k, v in flat_recipe(tree).items()}


class NonFiniteGuard:
    """Skips the update of a step whose gradient norm is NaN or infinite, without a host sync:
    the fused AdamW kernel reads the flag on the device and leaves weights and moments alone.
    The flags are read once per logging interval (a sync that happens there anyway), counted, and
    turned into a stop after `max_consecutive` in a row (`skip`) or the first (`stop`).

    With fp16 the loss scaler skips overflowing steps itself, and overflows are routine while it
    calibrates; a step counts here only once the scale has collapsed below 1. Under DeepSpeed the
    engine owns the optimiser step, and the guard is off."""

    def __init__(
        self, mode: str, max_consecutive: int, optimizer: torch.optim.Optimizer, state: TrainState, accelerator: Accelerator
    ) -> None:
        self.max_consecutive = 1 if mode == "stop" else max_consecutive
        self.enabled = accelerator.state.deepspeed_plugin is None
        self.scaler = accelerator.scaler
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.can_skip = self.enabled and self.scaler is None and bool(getattr(self.inner, "defaults", {}).get("fused"))
        self.state = state
        self.run: list[tuple[int, int, int]] = []  # (step, epoch, batch) of the current non-finite run
        self.pending: list[tuple[torch.Tensor, int, int, int]] = []  # (flag, step, epoch, batch)

    def before_step(self, grad_norm: torch.Tensor | None, step: int, epoch: int, batch: int) -> None:
        if not self.enabled or not isinstance(grad_norm, torch.Tensor):
            return
        flag = ~torch.isfinite(grad_norm)
        if self.scaler is not None:
            flag = flag & (self.scaler._scale < 1.0)  # a device tensor: no sync
        flag = flag.float().reshape(())
        if self.can_skip:
            self.inner.found_inf = flag
        self.pending.append((flag, step, epoch, batch))

    def settle(self) -> list[tuple[int, int, int]]:
        """Counts the pending flags (one host sync); the (step, epoch, batch) of the last non-finite
        run when it reached the limit, else []."""
        if not self.pending:
            return []
        flags = torch.stack([f for f, *_ in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for bad, (_, step, epoch, batch) in zip(flags, pending):
            if not bad:
                self.run = []
                continue
            self.state.nonfinite_steps += 1
            self.run.append((step, epoch, batch))
            if len(self.run) >= self.max_consecutive:
                return self.run
        return []


def describe_rows(sampler: NoDuplicatesBatchSampler, examples, sources, epoch: int, batch: int, last: int) -> str:
    """'source row, ...' of the batches `batch - last + 1 .. batch` (1-based in the epoch) of this process."""
    current = sampler.epoch, sampler.start_batch
    sampler.set_epoch(epoch)
    batches = sampler.batches()
    sampler.set_epoch(*current)
    names = []
    for index in [i for b in batches[max(0, batch - last) : batch] for i in b]:
        source = max(s for s, offset in enumerate(examples.offsets[:-1]) if offset <= index)
        names.append(f"{sources[source].name or sources[source].path} row {index - examples.offsets[source] + 1}")
    return ", ".join(names[:64]) + (f", ... ({len(names)} rows)" if len(names) > 64 else "")


def train(recipe: Recipe, resume: bool = False) -> dict[str, float]:
    """Train as the recipe says; returns the final evaluation metrics. A SIGTERM/SIGUSR1 at any
    point saves what there is to keep and raises `Preempted`. The run folder's summary.json says
    how the run ended, an error included."""
    record = RunRecord()
    with PreemptionWatch() as preemption:
        try:
            return _train(recipe, resume, preemption, record)
        except Preempted:
            raise
        except BaseException as exc:
            record.crashed(exc)
            raise


@dataclass
class RunRecord:
    """What `train` needs to write a run's summary, filled in as the run gets going."""

    clock: RunClock = field(default_factory=RunClock)
    run_dir: Path | None = None
    main_process: bool = False
    summary: Callable[..., dict] | None = None
    """Builds the summary for a status (set once the run's state exists)."""

    def write(self, status: str, **details) -> dict | None:
        if self.run_dir is None or not self.main_process or self.summary is None:
            return None
        summary = self.summary(status, **details)
        try:
            write_summary(self.run_dir, summary)
        except OSError as exc:  # the summary must not hide how the run ended
            print(f"warning: {self.run_dir / SUMMARY_FILE} not written: {exc}", file=sys.stderr)
        return summary

    def crashed(self, exc: BaseException) -> None:
        reason = "interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        self.write("crashed", reason=reason.splitlines()[0] if reason else type(exc).__name__)


@dataclass
class TrainingData:
    examples: TrainingSet
    sampler: NoDuplicatesBatchSampler
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    shape: RunShape


@dataclass
class Model:
    """What is trained: the encoder and the loss (whose parameters, if any, train too), each
    prepared by Accelerate, and the frozen encoders the loss reads (not trained, not saved)."""

    encoder: torch.nn.Module
    loss_fn: torch.nn.Module
    frozen: dict[str, Encoder]
    loss_parameters: list[torch.nn.Parameter]
    layers: tuple[int, ...] = ()
    """Earlier layers whose embeddings the loss reads (2D Matryoshka)."""
    trainable_only_checkpoints: bool = False
    """The resume state holds only the encoder's trainable parameters (LoRA, without DeepSpeed or FSDP)."""
    split: SubBatcher = field(default_factory=SubBatcher)
    """How the step cuts each column of a batch into sub-batches; counts the tokens processed."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters()) + self.loss_parameters

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder] + ([self.loss_fn] if self.loss_parameters else [])


def with_caches(frozen: dict[str, Encoder], configs: dict[str, object], run_dir: Path, rank: int) -> dict[str, torch.nn.Module]:
    """Frozen encoders whose config keeps a cache, wrapped with their `EmbeddingCache`: in
    `cache_dir`, or in the run folder's teacher_cache/ (kept across resumes)."""
    wrapped: dict[str, torch.nn.Module] = {}
    for key, encoder in frozen.items():
        config = configs[key]
        wrapped[key] = encoder
        if not config.cache:
            continue
        folder = Path(config.cache_dir) if config.cache_dir else run_dir / "teacher_cache" / cache_name(config)
        if isinstance(encoder, CrossEncoderScorer):  # one score per (query, document) pair
            encoder.cache = EmbeddingCache(folder, cache_identity(config), 1, rank)
        else:
            wrapped[key] = CachedEncoder(encoder, EmbeddingCache(folder, cache_identity(config), encoder.dim, rank))
    return wrapped


def set_score_candidates(recipe: Recipe, loss_fn: WeightedLoss, frozen: dict[str, torch.nn.Module], world_size: int) -> None:
    """Tell each cross-encoder teacher which candidates to score; in-batch candidates need one process
    (or no cross-device negatives), since a process holds only its own documents' texts."""
    for key, candidates in loss_fn.score_candidates().items():
        if candidates == "in_batch" and world_size > 1 and recipe.training.cross_device_negatives:
            raise RunError(
                f"a cross-encoder teacher ({frozen[key].model.name_or_path}) scores only this process's documents, "
                "so candidates: in_batch does not work with cross-device negatives; use candidates: own or "
                "training.cross_device_negatives: false"
            )
        frozen[key].candidates = candidates


def check_pairs(recipe: Recipe, loss_fn: WeightedLoss) -> None:
    """Single texts (a texts source) train only terms that need no pairs; pair terms need a pairs source."""
    texts = [s.kind == "texts" for s in recipe.data.train]
    if any(texts) and loss_fn.needs_pairs:
        raise RunError(
            "data.train has a texts source (single texts), but every loss term needs (query, positive) pairs; "
            "add a term that distills embeddings (embed_distill, jasper)"
        )
    if all(texts):
        paired = [name for name, term in zip(loss_fn.names, loss_fn.terms) if term.needs_pairs]
        if paired:
            raise RunError(f"loss {', '.join(paired)} needs (query, positive) pairs, but every training source is a texts source")


def _train(recipe: Recipe, resume: bool, preemption: PreemptionWatch, record: RunRecord) -> dict[str, float]:
    training = recipe.training
    clock = record.clock
    accelerator = build_accelerator(recipe)
    set_seed(recipe.seed)
    folder = check_run_dir(recipe, resume)
    run_dir = folder.path
    if folder.note:
        accelerator.print(folder.note)

    # ---------------------------------------------------------------- setup
    examples = read_training_data(recipe.data.train, recipe.data.num_negatives)
    encoder = Encoder.from_config(recipe.model)
    loaded: dict[str, Encoder] = {}  # frozen models, each loaded once: for a term's projection size, then for the step

    def frozen_model(config) -> Encoder:
        key = frozen_key(config)
        if key not in loaded:
            loaded[key] = load_frozen(config)
        return loaded[key]

    context = LossContext(encoder.dim, recipe.model.normalize, encoder.num_layers, frozen_dim=lambda c: frozen_model(c).dim)
    loss_fn = build_loss(recipe.loss, context)
    check_pairs(recipe, loss_fn)
    frozen = {key: frozen_model(config) for key, config in loss_fn.frozen_encoders().items()}
    set_score_candidates(recipe, loss_fn, frozen, accelerator.num_processes)
    labels, clustered_now = batch_clusters(recipe, accelerator, encoder, examples, folder)
    data = build_data(recipe, accelerator, examples, build_collator(recipe, encoder, frozen), labels)
    refresher = None
    if recipe.data.refresh_negatives is not None:
        refresher = NegativeRefresher(recipe.data.refresh_negatives, examples, run_dir, recipe.seed)
    evals = EvalRunner(recipe.evaluation, recipe, run_dir, recipe.checkpointing.save_best)  # reads the sets
    if preemption.should_stop(accelerator):
        raise Preempted(preemption.name, 0, None)
    create_run_dir(recipe, folder, accelerator)
    if clustered_now and accelerator.is_main_process:
        clusters.save(run_dir, labels)
    frozen = with_caches(frozen, loss_fn.frozen_encoders(), run_dir, accelerator.process_index)
    model, optimizer, scheduler = prepare_model(accelerator, recipe, encoder, loss_fn, frozen, data.total_steps)
    metrics_log = MetricsLog(accelerator, run_dir / METRICS_FILE)

    state = restore(accelerator, folder, data, scheduler, model) if folder.resume else TrainState(shape=asdict(data.shape))
    if state is None:  # resumed a finished run
        accelerator.end_training()
        return {}
    if recipe.logging.report_to:
        options, notes = trackers.init_kwargs(recipe.logging.report_to, run_dir, recipe.run_name)
        for note in notes:
            accelerator.print(note)
        config = {**flat_config(asdict(recipe)), **trackers.environment(accelerator)}
        accelerator.init_trackers(recipe.logging.project, config=config, init_kwargs=options)
    meter = LossMeter(accelerator.device, model.split)

    def refresh_negatives() -> None:
        with clock.timing("mining"):
            line = refresher.refresh(accelerator, accelerator.unwrap_model(model.encoder), forward_module(model.encoder), state.step)
        if progress is None or progress.disable:
            accelerator.print(line)
        else:
            progress.write(line)

    progress = None
    if refresher is not None:
        accelerator.print(refresher.describe())
        restored = refresher.restore(state.step) if folder.resume else None
        if restored is not None:
            accelerator.print(f"hard negatives: those mined at step {restored}")
        if restored != state.step and (refresher.due(state.step) or (state.step == 0 and refresher.config.at_start)):
            refresh_negatives()
    record.run_dir, record.main_process = run_dir, accelerator.is_main_process
    record.summary = lambda status, **details: end_summary(
        run_dir, status, state=state, total_steps=data.total_steps, metric_for_best=recipe.evaluation.metric_for_best,
        clock=clock, tokens_seen=model.split.tokens_seen, pairs_seen=meter.pairs_seen, resumed=folder.resume, **details,
    )
    if accelerator.is_main_process:
        write_summary(run_dir, running_summary(run_dir, data.total_steps, folder.resume))

    def save() -> Path:
        state.scheduler = scheduler.state_dict()
        with clock.timing("checkpointing"):
            for cached in frozen.values():  # a resumed run finds every text embedded so far
                if getattr(cached, "cache", None) is not None:
                    cached.cache.flush()
            return save_checkpoint(accelerator, model.encoder, state, run_dir, recipe.checkpointing.keep_last)

    def evaluate() -> dict[str, float]:
        """Evaluate now: log the metrics and keep the best model."""
        with clock.timing("evaluation"):
            release_free_memory()  # the steps' freed buffers, which evaluation's would come on top of
            metrics = evals.run(accelerator, model.encoder)
            metrics_log.write(state.step, metrics)
            evals.update_best(accelerator, model.encoder, metrics, state, model.loss_fn)
        return metrics

    def stop(saved_at: int | None) -> Preempted:
        """Saves unless this step is saved already (or nothing was trained); closes the run."""
        checkpoint = None
        if state.step > 0 or folder.resume:
            checkpoint = run_dir / f"step_{state.step}" if saved_at == state.step else save()
        progress.close()
        record.write("preempted", reason=preemption.name, checkpoint=None if checkpoint is None else str(checkpoint))
        accelerator.end_training()
        return Preempted(preemption.name, state.step, None if checkpoint is None else str(checkpoint))

    accelerator.print(
        f"{len(examples)} training examples, {data.steps_per_epoch} steps per epoch, {data.total_steps} steps, "
        f"batch {recipe.data.batch_size} x {accelerator.num_processes} process(es), run folder {run_dir}"
    )
    accelerator.print(describe_step(recipe, loss_fn, accelerator.num_processes, str(accelerator.mixed_precision)))
    accelerator.print(describe_parameters(encoder, encoder.backbone))
    accelerator.print(f"allocator: {configure_allocator()}")  # `embtrain` did it at start; a call from Python does it here
    saved_at = state.step if folder.resume else None
    if recipe.evaluation.at_start and state.step == 0 and recipe.evaluation.sets:
        with clock.timing("evaluation"):
            metrics_log.write(0, evals.run(accelerator, model.encoder, cached=True))
    # after the start evaluation, so that its time is not taken for training steps
    progress = progress_bar(
        total=data.total_steps, initial=state.step, desc="train", hide=not accelerator.is_local_main_process
    )
    if preemption.should_stop(accelerator):
        raise stop(saved_at)

    # ---------------------------------------------------------------- train
    model.encoder.train()
    clock.setup_done()
    meter.restart_clock()
    nonfinite = NonFiniteGuard(training.nonfinite, training.nonfinite_max_consecutive, optimizer, state, accelerator)

    def check_nonfinite() -> None:
        run = nonfinite.settle()
        if run:
            raise nonfinite_error(run, data, sources=recipe.data.train, training=training)

    metrics: dict[str, float] = {}
    while state.step < data.total_steps:
        data.sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in data.loader:
            batch = batch.to(accelerator.device, non_blocking=True)
            batch.progress = state.step / data.total_steps
            with accelerator.accumulate(*model.modules()):
                loss, parts = train_step(accelerator, recipe, model, batch)
                if accelerator.sync_gradients:
                    max_norm = math.inf if training.max_grad_norm is None else training.max_grad_norm
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    nonfinite.before_step(grad_norm, state.step + 1, state.epoch, state.batch_in_epoch + 1)
                    meter.add_grad_norm(grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            meter.add(loss, parts, batch.size * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            progress.update(1)

            if state.step % recipe.logging.log_every_steps == 0:
                check_nonfinite()  # one host sync per logging interval, not per step
                logged = meter.flush(scheduler.get_last_lr()[0], model.loss_fn, state.nonfinite_steps)
                metrics_log.write(state.step, logged)
                shown = float("nan") if logged["loss"] is None else logged["loss"]
                padding = logged.get("padding_efficiency")  # real tokens / tokens processed
                if progress.disable:  # no bar (TQDM_DISABLE, another process): a line per interval instead
                    accelerator.print(
                        f"step {state.step}/{data.total_steps}: loss {shown:.4f}, lr {logged['lr']:.2e}, "
                        f"{logged['pairs_per_s']:.1f} pairs/s" + ("" if padding is None else f", padding efficiency {padding:.2f}")
                    )
                else:
                    progress.set_postfix(
                        loss=f"{shown:.4f}", lr=f"{logged['lr']:.2e}", pairs_s=f"{logged['pairs_per_s']:.1f}",
                        **({} if padding is None else {"padding": f"{padding:.2f}"}),
                    )
            done = state.step >= data.total_steps
            every = recipe.evaluation.every_steps
            if every and state.step % every == 0 and not done and recipe.evaluation.sets:
                metrics = evaluate()
                meter.restart_clock()  # throughput counts training only
            every = recipe.checkpointing.every_steps
            if every and state.step % every == 0 and not done:
                check_nonfinite()
                save()
                saved_at = state.step
                meter.restart_clock()
            if refresher is not None and refresher.due(state.step) and not done:
                refresh_negatives()  # after a checkpoint of this step: a run resumed from it mines again
                meter.restart_clock()
                if data.loader.num_workers:
                    break  # the workers hold the old negatives: this epoch goes on from the next batch with new ones
            if done:
                break
            if preemption.should_stop_between_steps(accelerator):
                check_nonfinite()
                raise stop(saved_at)
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    check_nonfinite()
    if preemption.should_stop(accelerator):  # a signal during the last step: save before the final evaluation
        raise stop(saved_at)
    progress.close()

    # ---------------------------------------------------------------- finish
    if recipe.evaluation.at_end and recipe.evaluation.sets:
        metrics = evaluate()
    state.finished = True
    final = save()
    if preemption.should_stop(accelerator):
        record.write("preempted", reason=preemption.name, checkpoint=str(final))
        accelerator.end_training()
        raise Preempted(preemption.name, state.step, str(final))
    report_end(accelerator, recipe, state, final, record.write("finished", checkpoint=str(final)))
    return metrics


def describe_step(recipe: Recipe, loss_fn: WeightedLoss, num_processes: int, mixed_precision: str) -> str:
    """One line saying how each step runs: the loss terms, the cached loss, cross-device
    negatives, frozen models and the precision, so that a run shows what it does."""
    training = recipe.training

    def kinds(term) -> str:
        inner = getattr(term, "terms", None)
        return term.kind + (f"[{', '.join(kinds(t) for t in inner)}]" if inner else "")

    parts = ["loss " + " + ".join(kinds(term) for term in recipe.loss)]
    if training.grad_cache_chunk_size is not None:
        parts.append(f"cached loss in chunks of {training.grad_cache_chunk_size}")
    if training.gradient_accumulation_steps > 1:
        parts.append(f"gradient accumulation x{training.gradient_accumulation_steps} (negatives per micro-batch)")
    if num_processes > 1:
        parts.append("cross-device negatives" if training.cross_device_negatives else "negatives from each process only")
    frozen = [config.name_or_path for config in loss_fn.frozen_encoders().values()]
    if frozen:
        parts.append("frozen: " + ", ".join(frozen))
    parts.append(f"precision {mixed_precision}" + (" (auto)" if training.mixed_precision == "auto" else ""))
    return "step: " + "; ".join(parts)


def report_end(accelerator: Accelerator, recipe: Recipe, state: TrainState, final: Path, summary: dict | None) -> None:
    """The end of a finished run in the terminal: where it is saved, its summary table and plots."""
    accelerator.print(f"saved {final}")
    if state.nonfinite_steps:
        accelerator.print(f"warning: {state.nonfinite_steps} step(s) skipped for a NaN or infinite loss or gradient")
    if state.best_step is not None:
        accelerator.print(f"best {recipe.evaluation.metric_for_best} {state.best_metric:.4f} at step {state.best_step}")
    if summary is not None:
        accelerator.print(summary_table(summary))
        try:
            plots = write_plots(final.parent)
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
            accelerator.print(f"warning: plots not drawn: {exc}")
        else:
            if plots:
                accelerator.print("plots: " + ", ".join(str(p) for p in plots))
        accelerator.print(f"summary: {final.parent / SUMMARY_FILE}")
    accelerator.end_training()


def build_accelerator(recipe: Recipe) -> Accelerator:
    training = recipe.training
    trackers.check_installed(recipe.logging.report_to)
    run_dir = Path(recipe.checkpointing.output_dir) / recipe.run_name
    device_type = "cuda" if torch.cuda.is_available() and not training.cpu else "cpu"
    return Accelerator(
        mixed_precision=precision.resolve(training.mixed_precision, device_type),
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        cpu=training.cpu,
        log_with=recipe.logging.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(trackers.tensorboard_dir(run_dir))),
        step_scheduler_with_optimizer=False,
    )


def restore(accelerator: Accelerator, folder, data: TrainingData, scheduler, model: Model) -> TrainState | None:
    """The state of the newest checkpoint, everything restored from it, metrics after it dropped
    and recipe changes recorded; None when that run is already finished (nothing is recorded:
    no step runs under the changed settings)."""
    run_dir = folder.path
    state = resume_from(accelerator, run_dir, data.shape, model.encoder if model.trainable_only_checkpoints else None)
    scheduler.load_state_dict(state.scheduler)
    if state.finished and state.step >= data.total_steps:
        accelerator.print(
            f"{run_dir} is already finished at step {state.step} of {data.total_steps}; nothing to do "
            "(raise training.max_steps or training.epochs to train further)"
        )
        return None
    if accelerator.is_main_process:
        truncate_metrics(run_dir / METRICS_FILE, state.step)
    record_changes(folder, state.step, accelerator)
    state.finished = False
    return state


def build_collator(recipe: Recipe, encoder: Encoder, frozen: dict[str, Encoder]) -> Collator:
    """Prompts per source for the model; each frozen encoder tokenises with its own tokenizer and prompts."""
    sources = recipe.data.train
    prompts = [
        (
            recipe.model.query_prompt if s.query_prompt is None else s.query_prompt,
            recipe.model.document_prompt if s.document_prompt is None else s.document_prompt,
        )
        for s in sources
    ]
    frozen_tokenizers = {
        key: PairTexts() if isinstance(e, CrossEncoderScorer)
        else TextTokenizer(e.tokenizer, e.config.max_seq_length, [(e.config.query_prompt, e.config.document_prompt)], e.config.pool_prompt)
        for key, e in frozen.items()
    }
    return Collator(
        encoder.tokenizer, recipe.model.max_seq_length, prompts, [s.in_batch_negatives for s in sources], frozen_tokenizers,
        recipe.model.pool_prompt,
    )


def batch_clusters(recipe: Recipe, accelerator: Accelerator, encoder: Encoder, examples: TrainingSet, folder) -> tuple:
    """(cluster label per example or None, whether they were computed now): read back from the run
    folder on resume, else k-means over the queries' embeddings (data.clustered_batches) on the
    main process, sent to the others."""
    from accelerate.utils import broadcast_object_list

    from trainer.model.embedding_cache import cached_text_encoder
    from trainer.model.encoder import embedding_config

    config = recipe.data.clustered_batches
    if config is None:
        return None, False
    if folder.resume:
        labels = clusters.load(folder.path)
        if labels is not None:
            return labels, False
    found = [None]
    if accelerator.is_main_process:
        model_config = recipe.model if config.model is None else embedding_config(config.model, recipe.model.trust_remote_code)
        model = encoder if config.model is None else Encoder.from_config(model_config)
        model.to(accelerator.device)
        text_encoder = model
        if accelerator.num_processes == 1:  # the model as it starts: its embeddings may be known
            text_encoder = cached_text_encoder(model, model_config, accelerator.device.type, str(accelerator.mixed_precision))
        with accelerator.autocast():
            found[0], line = clusters.query_clusters(config, examples, text_encoder, recipe.seed)
        accelerator.print(line)
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    return found[0], True


def build_data(
    recipe: Recipe, accelerator: Accelerator, examples: TrainingSet, collator: Collator, labels=None
) -> TrainingData:
    training, sources = recipe.training, recipe.data.train
    sampler = NoDuplicatesBatchSampler(
        examples.keys,
        recipe.data.batch_size,
        seed=recipe.seed,
        shuffle=recipe.data.shuffle,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        weights=[s.weight for s in sources] if sources[0].weight is not None else None,
        homogeneous=recipe.data.batching == "homogeneous",
        accumulation_steps=training.gradient_accumulation_steps,
        clusters=labels,
    )
    if len(sampler) == 0:
        raise RunError(
            f"{len(examples)} training pairs give no batch of {recipe.data.batch_size} distinct pairs for each of "
            f"{accelerator.num_processes} process(es) x {training.gradient_accumulation_steps} accumulation steps; "
            "add data or lower data.batch_size"
        )
    # its own generator: starting an epoch must not draw from the global RNG that dropout uses,
    # or a resumed run would diverge from an uninterrupted one
    on_gpu = accelerator.device.type == "cuda"
    workers = recipe.data.num_workers if recipe.data.num_workers is not None else (GPU_LOADER_WORKERS if on_gpu else 0)
    loader = DataLoader(
        examples,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=on_gpu,  # with non-blocking copies in the loop, the copy overlaps the step
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    # the sampler trims each epoch to whole accumulation windows: no window spans two epochs
    steps_per_epoch = len(sampler) // training.gradient_accumulation_steps
    shape = RunShape(
        world_size=accelerator.num_processes,
        batch_size=recipe.data.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        data_fingerprint=examples.keys.fingerprint(),
    )
    total_steps = training.max_steps or training.epochs * steps_per_epoch
    return TrainingData(examples, sampler, loader, steps_per_epoch, total_steps, shape)


def find_packing(training: TrainingConfig, encoder: Encoder, say: Callable[[str], None] = print) -> Packing | None:
    """How the step packs texts (training.packing), after checking that the model runs packed
    rows correctly; `say`s which, or why it cannot."""
    setting = training.packing
    if setting == "off" or not training.sort_by_length:
        return None
    support = encoder.find_packing()
    if support is None:
        reason = f"{encoder.config.name_or_path}: {encoder.packing_refused}"
        if setting == "always":
            raise RunError(f"training.packing always: {reason}; set training.packing: auto or off")
        say(f"packing: off, {reason}")
        return None
    hidden = getattr(encoder.backbone.config, "hidden_size", None) or encoder.dim
    say("packing: every column" if setting == "always" else "packing: a column's texts share rows where that is cheaper (auto)")
    return Packing(support, always=setting == "always", attention_cost=attention_cost(hidden))


def prepare_model(
    accelerator: Accelerator,
    recipe: Recipe,
    encoder: Encoder,
    loss_fn: WeightedLoss,
    frozen: dict[str, Encoder],
    total_steps: int,
) -> tuple[Model, torch.optim.Optimizer, object]:
    """Optimiser and schedule over the encoder's and the loss's parameters, everything prepared
    by Accelerate (the loss only when it has parameters: DDP syncs their gradients and
    `save_state` checkpoints them); frozen encoders are just moved to the device."""
    training = recipe.training
    packing = find_packing(training, encoder, accelerator.print)  # before prepare: a forward of the whole model
    loss_parameters = loss_fn.trainable_parameters()
    optimizer = build_optimizer(encoder, recipe.optimizer, loss_parameters)
    scheduler = build_schedule(optimizer, recipe.schedule, total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        if training.grad_cache_chunk_size is not None:
            raise RunError(
                "training.grad_cache_chunk_size does not work with DeepSpeed, whose engine steps the "
                "optimiser on every backward pass; use DDP or FSDP (launch/accelerate/) for cached losses"
            )
        if loss_parameters:
            raise RunError(
                "loss terms with parameters (learn_temperature) do not work with DeepSpeed, whose engine takes "
                "one model; use DDP or FSDP (launch/accelerate/)"
            )
        # batches come from our own sampler, so DeepSpeed cannot infer the micro-batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
    if loss_parameters:
        encoder, loss_fn, optimizer = accelerator.prepare(encoder, loss_fn, optimizer)
    else:
        encoder, optimizer = accelerator.prepare(encoder, optimizer)
        loss_fn.to(accelerator.device)
    for frozen_encoder in frozen.values():
        frozen_encoder.to(accelerator.device)
    # LoRA: checkpoints without the frozen base weights (DeepSpeed and FSDP save their own way)
    trainable_only = is_lora(accelerator.unwrap_model(encoder).backbone) and accelerator.distributed_type not in (
        DistributedType.DEEPSPEED, DistributedType.FSDP
    )
    if trainable_only:
        keep_trainable_in_checkpoints(accelerator, encoder)
    split = SubBatcher(
        sort=recipe.training.sort_by_length,
        max_tokens=recipe.training.max_tokens_per_forward,
        buckets=recipe.training.shape_buckets,
        packing=packing,
    )
    model = Model(encoder, loss_fn, frozen, loss_parameters, loss_fn.layer_indices(), trainable_only, split)
    return model, optimizer, scheduler


def train_step(
    accelerator: Accelerator, recipe: Recipe, model: Model, batch: ContrastiveBatch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one batch, plain or cached."""
    training = recipe.training
    cross_device = training.cross_device_negatives and accelerator.num_processes > 1
    options = {"frozen": model.frozen, "normalized": recipe.model.normalize, "layers": model.layers, "split": model.split}
    if training.grad_cache_chunk_size is None:
        return plain_step(model.encoder, model.loss_fn, batch, accelerator.backward, cross_device, **options)
    return cached_step(
        model.encoder, model.loss_fn, batch, accelerator.backward, cross_device, training.grad_cache_chunk_size,
        lambda: accelerator.no_sync(model.encoder), loss_parameters=model.loss_parameters, **options,
    )


class LossMeter:
    """Means of the finite losses (and each term) over a logging interval, summed on the device,
    and the pairs per second since the clock was last started."""

    def __init__(self, device: torch.device, split: SubBatcher | None = None) -> None:
        self.device = device
        self.split = split
        self.pairs_seen = 0
        """Examples trained on since the run (this invocation) started, every process's."""
        self.reset()
        self.restart_clock()

    def reset(self) -> None:
        self.total = torch.zeros((), device=self.device)
        self.count = torch.zeros((), device=self.device)
        self.parts: dict[str, torch.Tensor] = {}
        self.part_counts: dict[str, torch.Tensor] = {}  # a term that sits out batches of single texts has fewer
        self.grad_norm = torch.zeros((), device=self.device)
        self.grad_norm_count = torch.zeros((), device=self.device)

    def restart_clock(self) -> None:
        self.started, self.pairs = time.perf_counter(), 0
        if self.split is not None:
            self.split.take_counts()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], pairs: int) -> None:
        finite = torch.isfinite(loss)
        self.total += torch.where(finite, loss, 0.0)
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0) + torch.where(finite, value, 0.0)
            self.part_counts[name] = self.part_counts.get(name, 0) + finite
        self.count += finite
        self.pairs += pairs
        self.pairs_seen += pairs

    def add_grad_norm(self, grad_norm) -> None:
        """The gradient norm before clipping of an optimiser step (None under DeepSpeed, which clips itself)."""
        if isinstance(grad_norm, torch.Tensor):
            finite = torch.isfinite(grad_norm)
            self.grad_norm += torch.where(finite, grad_norm.detach().float(), 0.0)
            self.grad_norm_count += finite

    def flush(self, lr: float, loss_fn: torch.nn.Module, nonfinite_steps: int) -> dict[str, float | None]:
        """The interval's values for the log (one host sync), then starts a new interval.
        Tokens are this process's: real ones per second, and real / processed (padding efficiency)."""
        count = self.count.item()
        mean = lambda total: (total / count).item() if count else None  # noqa: E731 - null: all non-finite
        seconds = time.perf_counter() - self.started
        logged = {"loss": mean(self.total), "lr": lr, "pairs_per_s": self.pairs / seconds}
        norms = self.grad_norm_count.item()
        if norms:
            logged["grad_norm"] = (self.grad_norm / norms).item()
        if self.split is not None:
            real, padded = self.split.real_tokens, self.split.padded_tokens
            if padded:
                logged.update(tokens_per_s=real / seconds, padding_efficiency=real / padded)
        if len(self.parts) > 1 or len(self.parts) < len(getattr(loss_fn, "module", loss_fn).names):
            for name, total in self.parts.items():
                seen = self.part_counts[name].item()
                logged[f"loss/{name}"] = (total / seen).item() if seen else None
        logged.update(learned_values(loss_fn))
        if nonfinite_steps:
            logged["nonfinite_steps"] = nonfinite_steps
        logged["peak_memory_gb"] = peak_memory()["peak_memory_gb"]
        self.reset()
        self.restart_clock()
        return logged


def learned_values(loss_fn: torch.nn.Module) -> dict[str, float]:
    """Learned temperatures of the loss's terms, by term name, for the log."""
    loss_fn = getattr(loss_fn, "module", loss_fn)  # under DDP
    values = {}
    for name, term in zip(loss_fn.names, loss_fn.terms):
        for inner_name, module in term.named_modules():
            if getattr(getattr(module, "config", None), "learn_temperature", False):
                suffix = f"/{inner_name}" if inner_name else ""
                values[f"temperature/{name}{suffix}"] = float(torch.as_tensor(module.temperature).detach())
    return values


def nonfinite_error(run: list[tuple[int, int, int]], data: TrainingData, sources, training) -> RunError:
    step, epoch, batch = run[-1]
    rows = describe_rows(data.sampler, data.examples, sources, epoch, batch, len(run) * training.gradient_accumulation_steps)
    what = "a NaN or infinite" if len(run) == 1 else f"{len(run)} steps in a row with a NaN or infinite"
    return RunError(
        f"{what} loss or gradient at step {step} (epoch {epoch}); those updates were skipped and the "
        f"weights are unchanged. Training rows of those batches on this process: {rows}. Check the data, "
        f"the learning rate and the temperature (training.nonfinite: {training.nonfinite})"
    )


def resume_from(
    accelerator: Accelerator, run_dir: Path, shape: RunShape, trainable_only: torch.nn.Module | None = None
) -> TrainState:
    """Loads the newest complete checkpoint (recovering one an interrupted save left aside) and
    refuses it when the run's shape (processes, batch, data) changed. `trainable_only`: the
    encoder whose checkpoints hold only its trainable parameters (LoRA)."""
    if accelerator.is_main_process:
        checkpoint, notes = find_resume_point(run_dir)
        for note in notes:
            print(f"--resume: {note}")
    accelerator.wait_for_everyone()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:  # pragma: no cover - check_run_dir found one
        raise RunError(f"--resume: no complete checkpoint in {run_dir}")
    saved = read_state(checkpoint)
    if saved.shape:
        differences = RunShape(**saved.shape).differences(shape)
        if differences:
            raise RunError(
                f"--resume: {checkpoint} was trained with other settings, so the position in the data would "
                "point at other pairs: " + "; ".join(differences) + ". Resume with the same number of processes "
                "and the same data, or start a new run (run_name=NEW_NAME)"
            )
    state = load_checkpoint(accelerator, checkpoint, trainable_only)
    accelerator.print(f"resumed from {checkpoint} (step {state.step}, epoch {state.epoch})")
    return state
