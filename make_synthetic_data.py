#!/usr/bin/env python
"""Writes a synthetic chromatic-aberration dataset as a `datasets` image folder (docs/training.md).
`python make_synthetic_data.py --help`; the code lives in citytools/cli/make_synthetic_data.py."""

import sys

from citytools.cli.make_synthetic_data import main

if __name__ == "__main__":
    sys.exit(main())
