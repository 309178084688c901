#!/usr/bin/env python
"""Trains a CityClassifier with the Hugging Face Trainer (docs/training.md).
`python train_hf.py --help`; the code lives in citytools/cli/train_hf.py."""

from citytools.cli.train_hf import main
from citytools.toolkit import run_cli

if __name__ == "__main__":
    run_cli(main)
