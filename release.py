#!/usr/bin/env python
"""Builds a Hub release folder for a model and uploads it as a tagged version (docs/release.md).
`python release.py --help`; the code lives in citytools/cli/release.py."""

from citytools.cli.release import main
from citytools.toolkit import run_cli

if __name__ == "__main__":
    run_cli(main)
