"""Finding the files to score: PATH arguments, folders walked once each (symlink loops end), @lists,
and the key that identifies a path in an output."""

import hashlib
import os
from pathlib import Path

# what a folder walk picks up
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif", ".jxl"}


def iter_files(paths, exclude=(), notice=None):
    """Yields absolute paths from PATH arguments, lazily: files as given, folders recursively
    (sorted, image extensions only, symlinked folders followed), and `@list.txt` files holding one
    path (a file or a folder) per line; blank lines and lines starting with `#` are skipped (a path
    that starts with `#` is written `./#name`). `good`, `./good` and `/abs/good` give the same paths.

    exclude: folders (os.stat identities) not to walk, e.g. a --move-to destination inside an input.
    notice(text): told of every folder left out (a loop, a second route, unreadable, excluded)."""
    visited = set()  # (st_dev, st_ino) of every folder walked: a symlink loop or a second route is walked once
    for arg in paths:
        arg = str(arg)
        if arg.startswith("@"):
            with open(arg[1:], encoding="utf-8", errors="surrogateescape") as listing:
                for line in listing:
                    line = line.rstrip("\n")
                    if line.strip() and not line.lstrip().startswith("#"):
                        yield from expand(line, visited, exclude, notice)
        else:
            yield from expand(arg, visited, exclude, notice)


def expand(path, visited, exclude, notice):
    path = os.path.abspath(path)
    if os.path.isdir(path):
        yield from walk(path, visited, exclude, notice)
    else:
        yield path


def walk(folder, visited=None, exclude=(), notice=None):
    """Image files under `folder` (absolute paths, depth first, sorted by name), following symlinked
    folders; each real folder is walked once, so a symlink loop ends."""
    visited = set() if visited is None else visited
    notice = notice or (lambda text: None)
    stack = [os.path.abspath(folder)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            notice(f"{folder}: cannot list this folder ({error.strerror or error}); its files are not scored")
            continue
        identity = (st.st_dev, st.st_ino)
        if identity in exclude:
            notice(f"{folder}: not scored, it is the --move-to/--copy-to destination")
            continue
        if identity in visited:
            notice(f"{folder}: already walked (a symlink loop or a second route to one folder); scored once")
            continue
        visited.add(identity)
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield entry.path  # broken symlinks included: they get an error row
        stack.extend(reversed(subfolders))


def folder_identity(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def root_of(path, paths):
    """The folder argument a discovered path came from (for --keep-structure), else its parent."""
    for arg in paths:
        arg = str(arg)
        if not arg.startswith("@") and os.path.isdir(arg):
            try:
                Path(path).relative_to(os.path.abspath(arg))
                return Path(os.path.abspath(arg))
            except ValueError:
                continue
    return Path(path).parent


def path_key(path):
    """64-bit key of a path: a million done files fit in 8 MB for resume."""
    return int.from_bytes(hashlib.blake2b(str(path).encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                          "little", signed=True)
