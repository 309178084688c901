"""The tool-kit's library: what classify.py, train_hf.py, benchmark.py and the other entry scripts at the
repo root share. Split by job (images, discovery, loading, devices, views, models, scorer, results,
transfers, cards, baseline; toolkit for the command lines' plumbing); `remote` is the one way in to
the remote-code files. Nothing here is remote code: the Hub never sees this package.

Importing it registers the repo root as the package `cityclassifier` (see `citytools.remote`), so
that the torch-free `cityclassifier.tiling` can answer a command line's choices before torch loads."""

import sys
import types
from pathlib import Path

if "cityclassifier" not in sys.modules:
    _package = types.ModuleType("cityclassifier")
    _package.__path__ = [str(Path(__file__).resolve().parent.parent)]
    sys.modules["cityclassifier"] = _package
