"""What every data_prep tool writes: a jsonl file and `<file>.manifest.json` beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
