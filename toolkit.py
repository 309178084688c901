"""Plumbing shared by the command-line tools: one-line errors and exit codes, argparse types, the
pixel limit, loading a dataset, label-folder names, output folders replaced whole."""

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
MAX_PIXELS = Image.MAX_IMAGE_PIXELS * 2  # Pillow raises DecompressionBombError above this; the tools say so per file
LABEL_FOLDER = re.compile(r"^(\d+)(?:_.*)?$")


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def run_cli(main, argv=None):
    """Runs `main(argv)`, turning `UsageError` into `error: ...` on stderr and exit status 2."""
    try:
        code = main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


def positive_int(text):
    """argparse type: an integer of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def non_negative_int(text):
    """argparse type: an integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def finite_float(text):
    """argparse type: a number, not nan or inf."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def fraction(text):
    """argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: not a fraction between 0 and 1")
    return value


def first_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_dataset(name, split=None, config=None, **folder_options):
    """A `datasets` dataset, or one split of it, from a local image folder (with `folder_options`,
    such as drop_labels) or a Hub id; UsageError in one line where it cannot be loaded (no such
    folder or Hub dataset, no such split, the Hub out of reach)."""
    import datasets

    try:
        if Path(name).is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(name), split=split, **folder_options)
        return datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UsageError(f"{name}: cannot load the dataset ({first_line(error)})") from None


def label_from_folder(name):
    """`0_reg` -> 0, `1_chroma_synthetic` -> 1, `2` -> 2: the number before the first underscore."""
    match = LABEL_FOLDER.match(name)
    return int(match.group(1)) if match else None


@contextmanager
def atomic_output_dir(out, overwrite=False):
    """Yields a temporary folder beside `out` that replaces `out` only when the block succeeds.
    A folder already there is replaced only with `overwrite`, and only if it is a model folder (it
    has a config.json, as everything these tools write there): `--out ~/Pictures --overwrite` is
    refused, not deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")
        if not (out / "config.json").is_file():
            raise UsageError(f"{out}: not replaced, although --overwrite: it is not a model folder (no config.json), "
                             "and its files would be lost; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
