#!/usr/bin/env python
"""Converts a released CityClassifiers head and a CLIP into a model folder (docs/conversion.md).
`python convert_original.py --help`; the code lives in citytools/cli/convert_original.py."""

from citytools.cli.convert_original import main
from citytools.toolkit import run_cli

if __name__ == "__main__":
    run_cli(main)
