"""Plumbing shared by the command-line tools: one-line errors and exit codes, argparse types, the
pixel limit, loading a dataset, label-folder names, locks that stay with the process that took them,
weights fingerprints, and the checks that refuse before any work (output folders, the Hub)."""

import argparse
import fcntl
import fnmatch
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent  # the repo root: the remote-code files, the shipped model, the tools
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = ("auto", "float32", "float16", "bfloat16")  # --dtype's choices; auto: see devices.pick_dtype
MAX_PIXELS = Image.MAX_IMAGE_PIXELS * 2  # Pillow raises DecompressionBombError above this; the tools say so per file


class PixelLimit(int):
    """A pixel limit that remembers the command-line flag that set it: the engine's error names the
    limit, and the flag only where a command line has one (`PixelLimit(n, "--max-pixels")`)."""

    def __new__(cls, value, flag=None):
        limit = super().__new__(cls, value)
        limit.flag = flag
        return limit

    def __reduce__(self):  # decoding workers get it pickled
        return (PixelLimit, (int(self), self.flag))


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


_HELD_LOCKS = set()  # fds whose flock this process holds: closed in every child it forks


def _drop_inherited_locks():
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_exclusive(fd):
    """Takes an exclusive flock on `fd` for this process alone. A flock belongs to the open file, which
    a forked child (a decoding worker) shares, so a child outliving a SIGKILLed parent would keep the
    lock: every child this process forks closes its copy at once. Raises BlockingIOError when another
    process holds it, OSError where the file system has no locks."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD_LOCKS.add(fd)


def release_lock(fd):
    """Releases a lock from `lock_exclusive` and closes its fd."""
    _HELD_LOCKS.discard(fd)
    os.close(fd)


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


def weights_fingerprint(name):
    """Digest of a model's safetensors files (a folder, or a Hub id's snapshot): what identifies the
    weights that scored a row or a benchmark."""
    folder = Path(name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.safetensors"]))
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def label_from_folder(name):
    """`0_reg` -> 0, `1_chroma_synthetic` -> 1, `2` -> 2: the number before the first underscore."""
    match = LABEL_FOLDER.match(name)
    return int(match.group(1)) if match else None


# What the model tools (average_models, convert_original, release) write into a model folder: --overwrite
# replaces a folder that holds nothing else.
# The remote code: what a model folder needs beside its weights for trust_remote_code (save_pretrained
# copies the model's file and every file it imports relatively).
REMOTE_CODE_FILES = ("configuration_cityclassifier.py", "modeling_cityclassifier.py", "image_processing.py",
                     "fringes.py", "native_fringes.py", "tiling.py")
MODEL_FOLDER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
                      "model-*-of-*.safetensors", *REMOTE_CODE_FILES, "README.md", "generation_config.json",
                      ".gitattributes")


def check_output_dir(out, overwrite=False, inputs=(), writes=MODEL_FOLDER_FILES, flag="--out", marker="config.json"):
    """Refuses, before any work, an output folder a tool may not write (UsageError, one line): a file;
    one of the tool's `inputs` (or a folder holding one); a folder with files in it, unless
    `overwrite`, and then only if it holds `marker` (a file the tool always writes) and nothing but
    what the tool writes (`writes`: names or glob patterns), so that `--out ~/Pictures --overwrite` or
    a training run's folder is refused, not deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file, not a folder")
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise UsageError(f"{flag} {out}: {out.parent} is a file, not a folder")
        return
    resolved = out.resolve()
    for given in inputs:
        path = Path(given)
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise UsageError(f"{flag} {out}: is one of this command's inputs ({given}); write elsewhere")
    contents = sorted(out.iterdir())
    if not contents:
        return
    if not overwrite:
        raise UsageError(f"{flag} {out}: output folder exists and is not empty (pass --overwrite to replace it)")
    foreign = [p.name + ("/" if p.is_dir() else "") for p in contents
               if p.is_dir() or not any(fnmatch.fnmatch(p.name, pattern) for pattern in writes)]
    if marker and not (out / marker).is_file():
        raise UsageError(f"{flag} {out}: not replaced, although --overwrite: it is not a folder this tool wrote "
                         f"(no {marker}), and its files would be lost; choose another {flag}")
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UsageError(f"{flag} {out}: not replaced, although --overwrite: it holds what this tool does not write "
                         f"({shown}), which would be lost; choose another {flag}")


def check_hub(what, token=None):
    """Refuses, before any work, a command that must reach the Hub when it cannot: HF_HUB_OFFLINE set,
    no network, or no valid token (UsageError naming `what`, e.g. "--push_to_hub")."""
    from huggingface_hub import constants, whoami

    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"{what}: the Hub is switched off here (HF_HUB_OFFLINE is set)")
    try:
        whoami(token=token)
    except Exception as error:  # noqa: BLE001 - no token, a bad one, or no network: one line
        raise UsageError(f"{what}: cannot reach the Hub with a token ({first_line(error)}); log in with "
                         "`hf auth login` or set HF_TOKEN") from None


def labels_from_folders(images):
    """Label ids from each `datasets` Image(decode=False) value's folder name (`1_chroma/x.png` -> 1),
    None where the folder has none. datasets' imagefolder drops folder labels when a metadata file is
    present; this restores them."""
    return [label_from_folder(Path(image["path"]).parent.name) if image and image.get("path") else None
            for image in images]


@contextmanager
def atomic_output_dir(out, overwrite=False, inputs=(), writes=MODEL_FOLDER_FILES):
    """Yields a temporary folder beside `out` that replaces `out` only when the block succeeds, after
    `check_output_dir`'s refusals (tools call that first, before their work, too)."""
    out = Path(out)
    check_output_dir(out, overwrite, inputs, writes)
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
