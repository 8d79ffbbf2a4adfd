"""What every data_prep tool shares: its standalone entry point, and its output (a jsonl file
and `<file>.manifest.json` beside it)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from trainer.data.errors import DataError
from trainer.errors import RunError
from trainer.schema import RecipeError


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the flag in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return value


def unwritable_folder(path: Path) -> str | None:
    """Why files cannot be created at `path` (its nearest existing folder is a file, or cannot be
    written in); None when they can. Tries it, since permission bits do not bind every user."""
    parent = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        return f"cannot write in {parent}: {exc.strerror}"
    return None


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing file unless asked, or to write where no file can be created,
    before any work is done."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the path of the file to write")
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it")
    problem = unwritable_folder(out.parent)
    if problem:
        raise DataError(f"--out {out}: {problem}")
    return out


class JsonlWriter:
    """Streams rows to `<out>.partial` while hashing them; `commit` renames the file into place
    and writes the manifest, `abort` removes it. A crash never leaves a half-written `out`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        out.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.partial.open("w", encoding="utf-8")
        self._hash = hashlib.sha256()
        self.rows = 0

    def write(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        self._handle.write(line)
        self._hash.update(line.encode("utf-8", "surrogatepass"))
        self.rows += 1

    def commit(self, manifest: dict | None) -> Path | None:
        """Writes `<out>.manifest.json` (with the row count and the file's sha256) unless `manifest`
        is None; returns its path."""
        self._handle.close()
        os.replace(self.partial, self.out)
        if manifest is None:
            return None
        manifest = {**manifest, "rows": self.rows, "sha256": self._hash.hexdigest()}
        path = self.out.with_name(self.out.name + ".manifest.json")
        path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        return path

    def abort(self) -> None:
        self._handle.close()
        self.partial.unlink(missing_ok=True)


def write_jsonl(rows: list[dict], out: Path, manifest: dict | None) -> Path | None:
    """Write the rows and the manifest (with the row count and the file's sha256) unless it is
    None; returns the manifest path."""
    writer = JsonlWriter(out)
    for row in rows:
        writer.write(row)
    return writer.commit(manifest)


def write_kept_and_rejected(rows: list[dict], rejected: list[dict], out: Path, manifest: dict) -> tuple[Path | None, Path]:
    """The rows and their manifest, and the rows left out in `<out>.rejected.jsonl` when there are
    any (named in the manifest as `rejected_file`); returns the manifest's and that file's paths."""
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    if rejected:
        write_jsonl(rejected, rejected_path, None)
        manifest["rejected_file"] = str(rejected_path)
    return write_jsonl(rows, out, manifest), rejected_path


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def tool_main(
    prog: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """`python -m data_prep.TOOL`: the same arguments and clean errors as `embtrain prep TOOL`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (DataError, RecipeError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # one the tool's own checks did not foresee (a full disk, say)
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2


def os_error_message(exc: OSError) -> str:
    """One line naming the file: `path: reason`."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
