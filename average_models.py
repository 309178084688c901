#!/usr/bin/env python
"""Averages the weights of two CityClassifiers of one architecture (docs/training.md).
`python average_models.py --help`; the code lives in citytools/cli/average_models.py."""

from citytools.cli.average_models import main
from citytools.toolkit import run_cli

if __name__ == "__main__":
    run_cli(main)
