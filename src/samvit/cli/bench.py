"""`samvit bench`: the side-by-side encoder benchmark (samvit.bench; also benchmarks/bench_encoder.py)."""
from __future__ import annotations

import argparse

from .. import bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    bench.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return bench.run(args)
