"""`embtrain` command line: train | validate | eval | export | push."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.output import os_error_message, positive_int
from trainer import precision
from trainer.allocator import configure_allocator
from trainer.config import (
    ModelConfig,
    PairsSource,
    RecipeError,
    RetrievalEvalConfig,
    STSEvalConfig,
    TextsSource,
    load_recipe,
    recipe_to_yaml,
)
from trainer.data.errors import DataError
from trainer.data.readers import first_problem, path_exists, peek_columns, resolve_format, utf8_problem
from trainer.errors import PREEMPTED_EXIT_CODE, Preempted, RunError

TRUST_HELP = "let a model whose config names its own Python code run it (only for models you trust)"


def check_paths(recipe) -> list[str]:
    """Data files and folders the recipe names that do not exist, and mapped columns their
    files lack (read from the first line or the schema only)."""
    missing = []
    for i, source in enumerate(recipe.data.train):
        if not path_exists(source.path):
            missing.append(f"data.train.{i}.path: {source.path} not found")
            continue
        fmt = getattr(source, "format", "auto")
        if source.kind in ("pairs", "texts") and fmt != "stsb":
            if Path(source.path).is_dir():
                missing.append(
                    f"data.train.{i}.path: {source.path} is a folder; a {source.kind} source reads a file "
                    f"(or a glob such as {source.path}/*.jsonl)"
                )
                continue
            try:
                fmt = resolve_format(source.path, fmt, texts=source.kind == "texts")
            except DataError as exc:
                missing.append(f"data.train.{i}.format: {exc}")
                continue
        if isinstance(source, PairsSource):
            keys = ("query_column", "positive_column", "negatives_column", "teacher_scores_column")
            mapped = [(key, getattr(source, key)) for key in keys]
        elif isinstance(source, TextsSource) and source.format != "stsb":
            mapped = [("text_columns", c) for c in source.text_columns] + [("title_column", source.title_column)]
        else:
            continue
        columns = peek_columns(source.path, fmt)
        for key, wanted in mapped:
            if columns is not None and wanted is not None and wanted not in columns:
                missing.append(f"data.train.{i}.{key}: {source.path} has no column '{wanted}' (columns: {columns})")
    for i, eval_set in enumerate(recipe.evaluation.sets):
        if not Path(eval_set.path).exists():
            missing.append(f"evaluation.sets.{i}.path: {eval_set.path} not found")
    missing += model_problems(recipe.model)
    return missing


def model_problems(model: ModelConfig) -> list[str]:
    """What is wrong with a local model folder, from its config.json alone: missing, not a model,
    unreadable, code that needs model.trust_remote_code, or max_seq_length beyond its positions.
    A Hub id is checked when it loads."""
    from trainer.model.encoder import ModelError, SequenceLengthError, load_backbone_config, locate_model

    try:
        if Path(locate_model(model.name_or_path)).is_dir():
            load_backbone_config(model)
    except SequenceLengthError as exc:
        return [f"model.max_seq_length: {exc}"]
    except ModelError as exc:
        return [f"model.name_or_path: {exc}"]
    return []


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_yaml(recipe), end="")
    missing = check_paths(recipe)
    for line in missing:
        print(f"error: {args.recipe}: {line}", file=sys.stderr)
    return 1 if missing else 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    missing = check_paths(recipe)
    if missing:
        hint = ""
        data_missing = any(line.startswith(("data.", "evaluation.")) for line in missing)
        if data_missing and "# Before:" in Path(args.recipe).read_text(encoding="utf-8", errors="replace"):
            hint = "; the recipe's first lines give the command (# Before:) that makes its data, run it first"
        raise RecipeError(f"{args.recipe}: " + "; ".join(missing) + hint)
    train(recipe, resume=args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluation import build_evaluator, evaluate_set
    from trainer.model.embedding_cache import cached_text_encoder
    from trainer.model.encoder import Encoder, SequenceLengthError, embedding_config

    config = embedding_config(args.model, args.trust_remote_code)
    for field in ("pooling", "max_seq_length", "query_prompt", "document_prompt", "num_layers"):
        if getattr(args, field) is not None:
            setattr(config, field, getattr(args, field))
    if args.no_normalize:
        config.normalize = False
    device = check_device(args.device) if args.device else None
    eval_sets = []
    if args.beir:
        eval_sets.append(
            RetrievalEvalConfig(
                kind="retrieval",
                name=Path(args.beir).name or "beir",
                path=args.beir,
                split=args.split,
                batch_size=args.batch_size,
                max_queries=args.max_queries,
            )
        )
    if args.sts:
        eval_sets.append(
            STSEvalConfig(kind="sts", name=Path(args.sts).stem, path=args.sts, format=args.sts_format, batch_size=args.batch_size)
        )
    if not eval_sets:
        raise RecipeError("eval: give --beir FOLDER and/or --sts FILE")
    evaluators = [read_eval_set(s, build_evaluator) for s in eval_sets]  # the data is checked before the model loads
    try:
        encoder = Encoder.from_config(config)
    except SequenceLengthError as exc:
        raise SequenceLengthError(f"--max-seq-length: {exc}" if args.max_seq_length else str(exc)) from None
    if device is not None:
        encoder.to(device)
    if args.dims and max(args.dims) > encoder.dim:
        raise RecipeError(f"--dims: {max(args.dims)} is more than the model's {encoder.dim} dimensions")
    if config.embedding_dim is not None:
        print(f"{args.model}: embeddings cut to {config.embedding_dim} dimensions (saved with the model)", file=sys.stderr)
    device_type = next(encoder.parameters()).device.type
    mixed_precision = precision.resolve(args.mixed_precision, device_type)
    precision.announce(args.mixed_precision, mixed_precision, device_type)
    text_encoder = cached_text_encoder(encoder, config, device_type, mixed_precision)
    metrics = {}
    for eval_set, evaluator in zip(eval_sets, evaluators):
        with precision.autocast(mixed_precision, device_type):
            values = evaluate_set(evaluator, text_encoder, args.dims or [], config.normalize)
        metrics.update(values if len(eval_sets) == 1 else {f"{eval_set.name}/{k}": v for k, v in values.items()})
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>24}  {value:.4f}")
    return 0


def read_eval_set(eval_set, build_evaluator):
    """The evaluator of one set, its data read now; a file that cannot be parsed is a DataError
    that names it (the STS reader leaves decoding and pandas' parse errors to its caller)."""
    try:
        return build_evaluator(eval_set)
    except DataError:
        raise
    except ValueError as exc:  # UnicodeDecodeError, pandas' ParserError and EmptyDataError, bad JSON
        fmt = getattr(eval_set, "format", "BEIR")
        if fmt in ("jsonl", "csv", "tsv"):
            problem = first_problem([Path(eval_set.path)], fmt)
        else:
            problem = utf8_problem(eval_set.path)
        raise DataError(problem or f"{eval_set.path}: cannot read as {fmt}: {exc}") from None


def check_device(name: str):
    """`--device` as a torch device that exists on this machine."""
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch: an unknown name; a missing CUDA build asserts
        raise RecipeError(f"--device {name!r}: not available here ({exc})") from None
    return device


def cmd_merge(args: argparse.Namespace) -> int:
    from trainer.merge import merge

    out = merge(args.models, args.out, args.weights, args.overwrite, args.trust_remote_code)
    weights = ", ".join(f"{w:.3g}" for w in json.loads((out / "merge.json").read_text())["weights"])
    print(f"merged {len(args.models)} models (weights {weights}) into {out}")
    print(f"evaluate: embtrain eval {args.out} --beir FOLDER; export: embtrain export {args.out} --out FOLDER")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.checkpoint import saved_step
    from trainer.export.model_card import write_model_card
    from trainer.export.sentence_transformers_folder import export

    result = export(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        truncate_dim=args.dim,
        num_layers=args.layers,
        overwrite=args.overwrite,
        check=not args.no_check,
        onnx=args.onnx,
        trust_remote_code=args.trust_remote_code,
        projection=args.projection,
        keep_adapter=args.keep_adapter,
        adapter_base=args.adapter_base,
    )
    checkpoint = Path(args.checkpoint)
    run_dir = checkpoint.parent if (checkpoint.parent / "recipe.yaml").exists() else None
    st_config = json.loads((result.folder / "config_sentence_transformers.json").read_text())
    pooling = result.folder / "1_Pooling" / "config.json"
    if pooling.exists():
        dimension = args.dim or json.loads(pooling.read_text())["word_embedding_dimension"]
    else:  # latent attention
        dimension = args.dim or json.loads((result.folder / "1_LatentAttention" / "config.json").read_text())["hidden_size"]
    if args.projection:  # the last module maps into the teacher's space
        last = json.loads((result.folder / "modules.json").read_text())[-1]
        dimension = json.loads((result.folder / last["path"] / "config.json").read_text())["out_features"]
    write_model_card(
        result.folder,
        name=args.name or result.folder.name,
        run_dir=run_dir,
        dimension=dimension,
        cut_dim=args.dim,
        cut_layers=args.layers,
        similarity=st_config["similarity_fn_name"],
        prompts=st_config["prompts"],
        language=args.language,
        license=args.license,
        base_model=args.base_model,
        datasets=args.datasets,
        step=saved_step(checkpoint),
        keep_adapter=args.keep_adapter,
    )
    if args.no_check:
        print(f"exported {result.folder} (parity not checked)")
    else:
        print(
            f"exported {result.folder}; parity with the trainer's embeddings: max |diff| "
            f"{result.max_abs_diff:.2e} <= {result.tolerance:.0e} ({args.dtype})"
            + (f"; ONNX {result.onnx_max_abs_diff:.2e}" if result.onnx_max_abs_diff is not None else "")
        )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from trainer.export.hub import plan_push, push

    if args.dry_run:
        print(plan_push(args.folder, args.repo_id, args.revision).describe())
        return 0
    url = push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {args.folder} to {url}")
    return 0


def parse_memory(text: str) -> int:
    """'24GB', '80G', '16GiB', '512MB' -> bytes (GB taken as GiB, as GPU makers' sizes are)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GgMm])(?:i?[Bb])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size such as 24GB or 512MB")
    return int(float(match.group(1)) * (2**30 if match.group(2).lower() == "g" else 2**20))


def cmd_estimate(args: argparse.Namespace) -> int:
    from trainer.estimate import SAFETY_MARGIN, estimate, gigabytes, needed, suggest_chunk_size, training_steps

    recipe = load_recipe(args.recipe, args.overrides)
    options = {"world_size": args.world_size, "device": args.device}
    plain = estimate(recipe, zero_stage=args.zero_stage, **options)
    steps = training_steps(recipe, args.world_size)
    lines = [f"{args.recipe}: {recipe.model.name_or_path}, batch {recipe.data.batch_size} per process x {args.world_size} "
             f"process(es), {recipe.model.max_seq_length} tokens per text (the worst case: every text that long)"]
    if isinstance(steps, str):
        lines.append(f"steps: unknown, the training data cannot be read ({steps})")
    else:
        lines.append(f"steps: {steps[0]} per epoch, {steps[1]} in all")
    trainable = plain.trainable_parameters
    lines.append(f"parameters: {trainable:,} trainable of {plain.total_parameters:,} ({100 * trainable / max(plain.total_parameters, 1):.2f}%)")
    columns = {"this recipe": plain}
    if recipe.training.grad_cache_chunk_size is None:
        columns[f"cached loss, chunks of {min(32, recipe.data.batch_size)}"] = estimate(
            recipe, zero_stage=args.zero_stage, chunk_size=min(32, recipe.data.batch_size), **options)
    if not recipe.model.gradient_checkpointing:
        name = "gradient checkpointing" if len(columns) > 1 else "this recipe + gradient checkpointing"
        columns[name] = estimate(recipe, zero_stage=args.zero_stage, gradient_checkpointing=True, **options)
    where = "GPU (memory PyTorch allocates)" if args.device == "gpu" else "CPU (resident memory)"
    lines.append(f"memory per process on a {where}, ZeRO stage {args.zero_stage}; GB = 2^30 bytes:")
    width = max(len(name) for name in columns) + 3
    lines.append(f"  {'':34}" + "".join(f"{name:>{width}}" for name in columns))
    for index, (label, _) in enumerate(plain.rows()):
        lines.append(f"  {label:34}" + "".join(f"{gigabytes(e.rows()[index][1]):>{width}}" for e in columns.values()))
    lines.append(f"  {'total':34}" + "".join(f"{gigabytes(e.total):>{width}}" for e in columns.values()))
    if args.world_size > 1:
        stages = "  ".join(f"stage {stage}: {gigabytes(estimate(recipe, zero_stage=stage, **options).total)}" for stage in range(4))
        lines.append(f"by ZeRO stage (DeepSpeed; FSDP full shard is about stage 3): {stages}")
    lines.extend(f"note: {note}" for note in plain.notes)
    lines.extend(measured_peak_lines(recipe, args.device, plain.total))
    status = 0
    if args.device_memory is not None:
        budget, wanted = args.device_memory, needed(plain, args.device)
        margin = f"{gigabytes(plain.total)} estimated, {gigabytes(wanted)} with the {SAFETY_MARGIN:.2f}x margin" + (
            " and the CUDA context" if args.device == "gpu" else "")
        if wanted <= budget:
            lines.append(f"fits {gigabytes(budget)}: {margin}")
        else:
            status = 3
            suggestion = suggest_chunk_size(recipe, budget, zero_stage=args.zero_stage, **options)
            advice = (f"set training.grad_cache_chunk_size={suggestion} (the same loss and gradients; "
                      f"{gigabytes(needed(estimate(recipe, zero_stage=args.zero_stage, chunk_size=suggestion, **options), args.device))} "
                      "with the margin)"
                      if suggestion else "even chunks of 1 text do not fit: try model.gradient_checkpointing: true, "
                      "model.lora, a shorter max_seq_length, bf16 weights or ZeRO sharding")
            lines.append(f"warning: does not fit {gigabytes(budget)}: {margin}; {advice}")
    print("\n".join(lines))
    return status


def measured_peak_lines(recipe, device: str, estimated: int) -> list[str]:
    """After the run: its measured peak against this estimate, when the run is of this very recipe
    and was measured on this kind of device."""
    from dataclasses import asdict

    from trainer.estimate import gigabytes
    from trainer.run_summary import read_summary

    run_dir = Path(recipe.checkpointing.output_dir) / recipe.run_name
    summary = read_summary(run_dir)
    if not summary or not summary.get("peak_memory_gb"):
        return []
    try:
        same = asdict(load_recipe(str(run_dir / "recipe.yaml"), [])) == asdict(recipe)
    except (RecipeError, DataError, OSError):
        same = False
    if not same:
        return [f"note: {run_dir} is a run of other settings than these; its peak is not compared"]
    kind = summary.get("peak_memory_kind")
    if (kind == "cpu_rss") != (device == "cpu"):
        return [f"note: {run_dir} was measured on a {'CPU' if kind == 'cpu_rss' else 'GPU'}; estimate with --device "
                f"{'cpu' if kind == 'cpu_rss' else 'gpu'} to compare"]
    measured = summary["peak_memory_gb"] * 2**30
    return [f"measured peak of {run_dir} ({summary['status']}): {gigabytes(measured)}, {measured / estimated:.2f}x this estimate"]


def cmd_runs(args: argparse.Namespace) -> int:
    from trainer.run_summary import list_runs, runs_table

    folder = Path(args.folder)
    if not folder.is_dir():
        raise RecipeError(f"runs: {folder} is not a folder (give the checkpoints folder, checkpointing.output_dir)")
    runs = list_runs(folder)
    print(json.dumps(runs, indent=2) if args.json else runs_table(runs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embtrain", description="Train contrastive text-embedding models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a recipe YAML")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.max_steps=10")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this run")
    train.set_defaults(func=cmd_train)

    validate = commands.add_parser("validate", help="print the resolved recipe; non-zero exit on any error")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=cmd_validate)

    evaluate = commands.add_parser("eval", help="evaluate a model folder or checkpoint")
    evaluate.add_argument("model", help="model folder, checkpoint step_N folder, Hub id or package:NAME")
    evaluate.add_argument("--beir", help="BEIR folder for retrieval metrics")
    evaluate.add_argument("--split", default="test", help="qrels split of the BEIR folder (default: test)")
    evaluate.add_argument("--max-queries", type=positive_int, help="evaluate only the first N queries")
    evaluate.add_argument("--sts", help="STS file for Spearman correlation")
    evaluate.add_argument("--sts-format", default="stsb", choices=["stsb", "csv", "tsv", "jsonl"])
    evaluate.add_argument("--batch-size", type=positive_int, default=64)
    evaluate.add_argument("--pooling", choices=["mean", "cls", "last_token"], help="override the saved pooling")
    evaluate.add_argument("--max-seq-length", type=positive_int, help="override the saved maximum length")
    evaluate.add_argument("--query-prompt", help="override the saved query prompt")
    evaluate.add_argument("--document-prompt", help="override the saved document prompt")
    evaluate.add_argument("--no-normalize", action="store_true", help="do not L2-normalise embeddings")
    evaluate.add_argument(
        "--dims", type=positive_int, nargs="+", help="also report each metric with embeddings cut to these sizes (@dimN)"
    )
    evaluate.add_argument(
        "--layers", dest="num_layers", type=positive_int,
        help="keep only the first N transformer layers (models trained with adaptive_layers)",
    )
    evaluate.add_argument("--device", help="e.g. cuda or cpu (default: cpu)")
    evaluate.add_argument("--mixed-precision", choices=["no", "bf16", "auto"], default="no", help=precision.HELP)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    evaluate.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="write a sentence-transformers folder with a model card")
    export.add_argument("checkpoint", help="checkpoints/RUN/step_N, checkpoints/RUN/best or an embtrain model folder")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight precision")
    export.add_argument("--dim", type=positive_int, help="truncate embeddings to the first N dimensions (Matryoshka models)")
    export.add_argument(
        "--layers", type=positive_int, help="keep only the first N transformer layers (models trained with adaptive_layers)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    export.add_argument(
        "--projection", nargs="?", const="auto",
        help="end with a distillation term's learned projection into the teacher's space (a name, or the only one)",
    )
    export.add_argument(
        "--keep-adapter", action="store_true",
        help="a LoRA checkpoint: write the adapter (loads with peft onto its base) instead of the merged weights",
    )
    export.add_argument(
        "--adapter-base", metavar="NAME",
        help="with --keep-adapter: the base model the adapter names (a Hub id such as "
        "sentence-transformers/all-MiniLM-L6-v2), instead of the local path it was trained from",
    )
    export.add_argument("--onnx", action="store_true", help="also write onnx/model.onnx (pip install 'embtrain[onnx]')")
    export.add_argument("--no-check", action="store_true", help="skip the parity checks")
    export.add_argument("--name", help="model name in the card, e.g. user/my-model (default: folder name)")
    export.add_argument("--language", nargs="+", help="language codes for the card metadata, e.g. en")
    export.add_argument("--license", help="licence for the card metadata, e.g. apache-2.0")
    export.add_argument("--base-model", help="Hub id of the base model for the card (default: the recipe's, if a Hub id)")
    export.add_argument("--datasets", nargs="+", help="Hub ids of the training data sets for the card metadata")
    export.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    export.set_defaults(func=cmd_export)

    push = commands.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    push.add_argument("folder", help="folder written by embtrain export")
    push.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded and stop")
    push.set_defaults(func=cmd_push)

    estimate = commands.add_parser("estimate", help="steps, parameters and the memory a training step needs, before a run")
    estimate.add_argument("recipe", help="recipe YAML file")
    estimate.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    estimate.add_argument("--world-size", type=positive_int, default=1, help="processes (GPUs) the run will use")
    estimate.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage (3: like FSDP)")
    estimate.add_argument("--device", choices=["cpu", "gpu"], default="gpu", help="where the run will train")
    estimate.add_argument("--device-memory", type=parse_memory, help="memory per device, e.g. 24GB: say whether the step fits")
    estimate.set_defaults(func=cmd_estimate)

    merge = commands.add_parser("merge", help="average several fine-tuned models' weights (model soup) into a model folder")
    merge.add_argument("models", nargs="+", help="two or more checkpoints (RUN/best, RUN/step_N) or embtrain model folders")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per model, scaled to sum to 1 (default: uniform)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    merge.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    merge.set_defaults(func=cmd_merge)

    runs = commands.add_parser("runs", help="list the runs in a checkpoints folder: status, step, best metric")
    runs.add_argument("folder", nargs="?", default="checkpoints", help="the checkpoints folder (default: checkpoints)")
    runs.add_argument("--json", action="store_true", help="print the list as JSON")
    runs.set_defaults(func=cmd_runs)

    prep = commands.add_parser("prep", help="data preparation tools (data_prep/)")
    tools = prep.add_subparsers(dest="tool", required=True)
    from data_prep import decoder, embed, ingest, leakage, mine, relabel, score, student
    from data_prep import filter as filter_pairs

    for name, module, help_text in (
        ("ingest", ingest, "check and normalise a training set (any format), remove duplicates and leaks"),
        ("mine", mine, "mine hard negatives with an embedding model"),
        ("filter", filter_pairs, "keep pairs whose positive a model ranks in its top k (consistency filtering)"),
        ("relabel", relabel, "let a teacher pick each query's positive and hard negatives among retrieved candidates (Gecko)"),
        ("leakage", leakage, "drop training rows whose query occurs in evaluation data"),
        ("score", score, "add a teacher's scores (embedding model or cross-encoder)"),
        ("student", student, "build a distillation student from chosen layers of a model"),
        ("embed", embed, "embed a recipe's training texts with its teachers ahead of training"),
        ("decoder", decoder, "build a small random decoder (Qwen2, Llama, Mistral) to try decoder recipes"),
    ):
        tool = tools.add_parser(name, help=help_text)
        module.add_arguments(tool)
        tool.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options: `train r.yaml --resume training.max_steps=20`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_allocator()  # before the first large tensor: keeps freed activation memory for reuse
    try:
        return args.func(args)
    except (RecipeError, DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(str(exc), file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except OSError as exc:  # a file operation the commands' own checks did not foresee (a full disk, say)
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
