"""The `embtrain` command: picks the allocator before anything heavy is imported, then runs the CLI."""

from __future__ import annotations

import sys


def main() -> None:
    from trainer.allocator import preload_allocator

    preload_allocator()  # may run the command again under tcmalloc or jemalloc (trainer/allocator.py)
    from trainer.cli import main as cli_main

    sys.exit(cli_main())
