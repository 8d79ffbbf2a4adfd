"""Hard negatives mined again during training with the model being trained (ANCE, Conan).

The pairs of the training set become a mining task (distinct queries; the corpus is every
positive plus `data.refresh_negatives.corpus`), and every `every_steps` steps the model embeds
the corpus and the queries (each process a share, as in evaluation), `prep mine`'s selection picks
new negatives with the same false-negative guard, and the training set serves them from then
on. Each refresh is saved as `negatives/step_<N>.npy` (corpus rows per example, -1 where a row
serves the file's negatives) in the run folder; a resumed run applies the newest one at or before its step.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from trainer.config import RefreshNegativesConfig
from trainer.data.errors import DataError
from trainer.data.training_set import PAD, TrainingSet, text_key

FOLDER = "negatives"
KEEP = -1
"""A row's entry when it keeps the negatives it had (too few candidates passed the guard)."""


def read_extra_corpus(path: str) -> list[str]:
    """Documents of a BEIR folder (its corpus.jsonl) or of a jsonl with `text` (and `title`)."""
    from trainer.data.beir import document_texts, read_corpus

    folder = Path(path)
    if folder.is_dir():
        return list(read_corpus(folder / "corpus.jsonl").values())
    if not folder.exists():
        raise DataError(f"data.refresh_negatives.corpus: {path} not found")
    return list(document_texts(folder))


class NegativeRefresher:
    def __init__(self, config: RefreshNegativesConfig, examples: TrainingSet, run_dir: Path, seed: int) -> None:
        from data_prep.mine import MiningTask

        self.config = config
        self.examples = examples
        self.folder = run_dir / FOLDER
        self.seed = seed
        self.width = examples.num_negatives
        from trainer.data.beir import DistinctTexts

        corpus = DistinctTexts()
        queries: dict[str, int] = {}
        positives: list[list[int]] = []
        self.pair_examples: dict[tuple[str, str], list[int]] = {}
        index = 0
        for table in examples.tables:
            for query, positive in zip(table["query"], table["positive"]):
                if query not in queries:
                    queries[query] = len(queries)
                    positives.append([])
                row = corpus.add(positive)
                if row not in positives[queries[query]]:
                    positives[queries[query]].append(row)
                self.pair_examples.setdefault((query, positive), []).append(index)
                index += 1
        if config.corpus:
            for text in read_extra_corpus(config.corpus):
                corpus.add(text)
        self.row_of = corpus.row_of
        self.task = MiningTask(queries=list(queries), corpus=corpus.texts, positives=positives)
        self.corpus_keys = np.array([text_key(t) for t in corpus.texts], dtype=np.int64)
        self.file_keys = examples.keys.negatives.copy()
        self.current = np.full((len(examples), self.width), KEEP, dtype=np.int32)
        """The negatives served now, as corpus rows (KEEP: the file's)."""

    def due(self, step: int) -> bool:
        return step > 0 and step % self.config.every_steps == 0

    def describe(self) -> str:
        c = self.config
        return (f"hard negatives mined again every {c.every_steps} steps{' and at the start' if c.at_start else ''}: "
                f"{len(self.task.queries)} queries against {len(self.task.corpus)} documents, ranks {c.ranks[0]}-{c.ranks[1]}")

    def refresh(self, accelerator, encoder, module, step: int) -> str:
        """Mine with the model as it is now and serve the new negatives; returns a line saying what changed."""
        from accelerate.utils import broadcast_object_list

        from data_prep.mine import MiningSettings, select_negatives
        from trainer.evaluation.sharded import ShardedEncoder

        started = time.perf_counter()
        c = self.config
        text_encoder = ShardedEncoder(accelerator, encoder, module)
        with torch.no_grad():
            documents = text_encoder.encode(self.task.corpus, is_query=False, batch_size=c.batch_size, progress="mine: corpus")
            queries = text_encoder.encode(self.task.queries, is_query=True, batch_size=c.batch_size, progress="mine: queries")
        found = [None]
        if accelerator.is_main_process:
            settings = MiningSettings(
                num_negatives=self.width, rank_min=c.ranks[0], rank_max=c.ranks[1], margin=c.margin,
                relative_margin=c.relative_margin, sampling=c.sampling, seed=self.seed + step, batch_size=c.batch_size,
            )
            rows, _ = select_negatives(self.task, queries, documents, settings)
            found[0] = self._rows_to_array(rows)
        if accelerator.num_processes > 1:
            broadcast_object_list(found)
        new = found[0]
        changed = int((new[:, 0] != KEEP).sum())
        served = np.where(new[:, :1] == KEEP, self.current, new)  # a row without enough candidates keeps its negatives
        if accelerator.is_main_process:
            self._save(served, step)
        self.apply(served)
        return (f"step {step}: mined new hard negatives for {changed} of {len(new)} pairs "
                f"({len(new) - changed} kept theirs: too few candidates) in {time.perf_counter() - started:.1f} s")

    def _rows_to_array(self, rows: list[dict]) -> np.ndarray:
        chosen = np.full((len(self.examples), self.width), KEEP, dtype=np.int32)
        for row in rows:
            for index in self.pair_examples[(row["query"], row["positive"])]:
                chosen[index] = [self.row_of[t] for t in row["negatives"]]
        return chosen

    def apply(self, served: np.ndarray) -> None:
        """Serve these negatives from now on (rows of KEEP: the file's), and give the batch sampler their keys."""
        self.current = served
        self.examples.set_negatives(self.task.corpus, served)
        rows = served[:, 0] != KEEP
        keys = self.examples.keys.negatives
        keys[:] = self.file_keys
        keys[rows, : self.width] = self.corpus_keys[served[rows]]
        keys[rows, self.width :] = PAD

    def _save(self, chosen: np.ndarray, step: int) -> None:
        from trainer.data.clusters import npy_bytes
        from trainer.run_dir import write_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / f"step_{step}.npy", npy_bytes(chosen))

    def saved_steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.removeprefix("step_")) for p in self.folder.glob("step_*.npy") if p.stem.removeprefix("step_").isdigit())

    def restore(self, step: int) -> int | None:
        """Apply the newest refresh at or before `step` (a resumed run); returns its step, None if none."""
        steps = [s for s in self.saved_steps() if s <= step]
        if not steps:
            return None
        self.apply(np.load(self.folder / f"step_{steps[-1]}.npy"))
        return steps[-1]
