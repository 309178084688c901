#!/usr/bin/env python
"""Benchmarks models on a labelled split: metrics, plots, model cards (docs/benchmark.md).
`python benchmark.py --help`; the code lives in citytools/cli/benchmark.py."""

from citytools.cli.benchmark import main
from citytools.toolkit import run_cli

if __name__ == "__main__":
    run_cli(main)
