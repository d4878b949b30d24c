"""Latency of real early exit against the static student (and teacher): `erde bench` as a script.

    python bench/latency.py RUN|EXPORT_DIR [--reference TEACHER_RUN] [--thresholds 0,0.5]
        [--batch 1,64] [--repeats 100] [--warmup 10] [--threads 1]

See `erde.deploy.latency` for the method and docs/benchmarks.md for recorded results.
"""

from __future__ import annotations

import argparse
import sys

from erde.cli.deploy import add_bench_arguments, bench_command
from erde.errors import ErdeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        bench_command(args)
    except ErdeError as exc:
        print(f"bench/latency.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
