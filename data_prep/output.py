"""What every data_prep tool shares: its standalone entry point, and its output (a jsonl file
and `<file>.manifest.json` beside it)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

from trainer.data.errors import DataError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing file unless asked, before any work is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it")
    return out


def write_jsonl(rows: list[dict], out: Path, manifest: dict) -> Path:
    """Write the rows and the manifest (with the row count and the file's sha256); returns the manifest path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    out.write_text(text, encoding="utf-8")
    manifest = {**manifest, "rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    path = out.with_name(out.name + ".manifest.json")
    path.write_text(json.dumps(manifest, indent=2))
    return path


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
    try:
        return run(parser.parse_args(argv))
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
