#!/usr/bin/env python
"""Scores and filters image collections with CityClassifier models (docs/classify.md). `python classify.py --help`.
The code lives in citytools/cli/: the command line is parsed before torch is imported, so --help and
bad arguments answer at once."""

from citytools.cli.classify_args import parse_args
from citytools.toolkit import run_cli

if __name__ == "__main__":
    parse_args()  # --help and bad arguments get their answer before the imports below, which take seconds
    from citytools.cli.classify import main

    run_cli(main)
