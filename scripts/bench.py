#!/usr/bin/env python3
"""Benchmarks: ``scripts/bench.py upload|render|deliver|page|signed [options]``.

Each benchmark lives in ``scripts/bench_<name>.py`` with a ``main(argv) -> int`` and prints a
Markdown table whose ratios compare filedrop with a baseline measured in the same run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("upload", "render", "deliver", "page", "signed")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in NAMES:
        print(f"usage: scripts/bench.py {{{'|'.join(NAMES)}}} [options]", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{argv[0]}", HERE / f"bench_{argv[0]}.py")
    if spec is None or spec.loader is None or not (HERE / f"bench_{argv[0]}.py").exists():
        print(f"bench {argv[0]!r} is not written yet", file=sys.stderr)
        return 2
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return int(mod.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
