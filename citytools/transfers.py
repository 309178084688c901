"""Copies and moves users' files so that none is ever lost or doubled, whatever happens.

A file goes to DEST in four steps, each safe to be killed after:
1. it is put at a hidden name of its own in DEST, `.NAME.<source key>.partial` (a hard link to the
   source, or a copy flushed to disk when DEST is on another file system);
2. that is linked to the first free name of NAME, NAME_1, ... (a link never overwrites: a name
   taken by anyone, even by an identical file, is skipped);
3. "SOURCE -> NAME" is appended to DEST's ledger, `.classify-transfers.jsonl`;
4. the hidden name is removed, and for a move the source is unlinked.
A rerun finds the hidden name of a source still there and the final name that is the same file,
or the ledger line, and finishes the job instead of placing the file twice. The source is only
ever unlinked once a copy of it exists under a name that no other source maps to, and DEST is
locked for the run, so that two processes never move into one folder at once.

Where DEST's file system has no hard links (exFAT, FAT, CIFS, ...), step 2 renames the hidden file
to the first free name with a rename that refuses to overwrite (renameat2's RENAME_NOREPLACE),
after a ledger line saying so; a rerun that finds neither the hidden file nor a finished line
looks for the placed copy by its bytes. DEST with neither is refused before anything is scored.
Names longer than the file system allows once `_n` or the hidden name's parts are added are
shortened, whole characters off the end of the stem.
"""

import ctypes
import errno
import filecmp
import functools
import json
import os
import shutil
import signal
from pathlib import Path

from citytools.discovery import path_key
from citytools.results import repair_tail
from citytools.toolkit import UsageError, lock_exclusive, release_lock

LEDGER = ".classify-transfers.jsonl"
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)  # what link(2) says where a file system has none


class TransferError(Exception):
    """One file could not be copied or moved; the message is the one-line reason."""


class SourceGone(TransferError):
    """The file is no longer at the path its row names (moved or deleted since it was scored)."""


def inside(path, folder):
    """Whether `path` is `folder` or lies under it, comparing real locations (symlinks resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Transfers:
    """Copies (move=False) or moves files into `dest`; one instance per run holds DEST's lock."""

    def __init__(self, dest, move):
        self.dest, self.move = Path(os.path.abspath(dest)), move
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self.lock_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY)
            self.name_max = name_max(self.dest)
            self.links = probe_placing(self.dest)
        except OSError as error:
            raise UsageError(f"{self.dest}: cannot write there ({error.strerror or error})") from None
        if self.links is None:
            raise UsageError(f"{self.dest}: its file system has neither hard links nor renames that refuse to "
                             "overwrite, so files cannot be placed there without risking another file; choose "
                             "another destination")
        try:
            lock_exclusive(self.lock_fd)
        except BlockingIOError:
            raise UsageError(f"{self.dest}: another process is copying or moving files into it; wait for it") from None
        except OSError as error:  # a file system without locks (some network and FUSE mounts)
            raise UsageError(f"{self.dest}: cannot be locked against a second process ({error.strerror or error}); "
                             "choose a destination on another file system") from None
        self.steps, self.kill_at = 0, int(os.environ.get("CITYCLASSIFIER_KILL_AT_TRANSFER_STEP", "0"))
        self.ledger_path = self.dest / LEDGER
        repair_tail(self.ledger_path)  # a line torn by a kill would swallow the next one
        self.placed = self.read_ledger()
        self.ledger = open(self.ledger_path, "a", encoding="utf-8", errors="surrogateescape")

    def read_ledger(self):
        """{source path: {"dst", "hidden", "id" (the source's identity)}} of every transfer into DEST."""
        placed = {}
        if self.ledger_path.exists():
            with open(self.ledger_path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        placed[record.pop("src")] = record  # a later line of a source stands for it
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # not a ledger line: that transfer, if any, is finished from its hidden name
        return placed

    def close(self):
        self.ledger.close()
        release_lock(self.lock_fd)

    def transfer(self, source, relative):
        """Copies or moves `source` to DEST/relative (or NAME_n beside it). Returns (destination,
        whether this call placed it); raises TransferError with a one-line reason."""
        source = str(source)
        target = self.dest / relative
        hidden = hidden_name(target, source, self.name_max)
        done = self.placed.get(source) or {}
        placed = None
        try:
            if "dst" in done and os.path.lexists(done["dst"]):
                finished = not os.path.lexists(source) or identity(source) == done["id"]
                if finished:  # by an earlier run; one killed before its last steps is finished here
                    placed = Path(done["dst"])
                    unlink(done["hidden"] if "hidden" in done else hidden)
                    if self.move:
                        self.remove_source(source, placed)
                        self.step()
                    return placed, False
                # else another file has taken that path since: it is transferred like any other
            if not os.path.lexists(source):
                raise SourceGone("no longer at its path")
            target.parent.mkdir(parents=True, exist_ok=True)
            if "placing" in done and not os.path.lexists(done["hidden"]) and identity(source) == done["id"]:
                placed = self.find_renamed(source, Path(done["placing"]))  # killed after its rename: where to?
            elif os.path.lexists(hidden) and self.links:
                placed = already_linked(hidden, target, self.name_max)
            if placed is None:
                if "placing" in self.placed.get(source, {}):  # not renamed: no rerun may look for it from now on
                    self.record(source, {"dropped": True})
                self.stage(source, hidden)
                self.step()
                placed = self.place(source, hidden, target)
                self.step()
            self.record(source, {"dst": str(placed), "hidden": str(hidden), "id": identity(source)})
            self.step()
            unlink(hidden)  # after a rename: not there any more
            self.step()
            if self.move:
                self.remove_source(source, placed)
                self.step()
        except OSError as error:
            if placed is None and os.path.lexists(hidden):
                if "placing" in self.placed.get(source, {}):
                    self.record(source, {"dropped": True})  # a rerun must not look for a copy that was never placed
                unlink(hidden)  # not linked anywhere yet: the source is still whole
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
                raise UsageError(f"{target}: cannot write ({error.strerror}); nothing was lost: make room and "
                                 "rerun to finish") from None
            raise TransferError(f"{error.strerror or error}") from None
        return placed, True

    def place(self, source, hidden, target):
        """Gives the staged file its final name: a hard link, or where DEST has none, a rename that
        refuses to overwrite, after a ledger line that lets a rerun look for it (`find_renamed`)."""
        if self.links:
            return link_free_name(hidden, target, self.name_max)
        self.record(source, {"placing": str(target), "hidden": str(hidden), "id": identity(source)})
        self.step()
        for name in candidates(target, self.name_max):
            try:
                rename_noreplace(hidden, name)
                return name
            except FileExistsError:
                continue

    def find_renamed(self, source, target):
        """The name a killed run renamed the source's copy to: the first of `candidates(target)` with
        the source's bytes (another identical file there holds them as well), or None."""
        free = 0
        for name in candidates(target, self.name_max):
            if not os.path.lexists(name):
                free += 1
                if free > 16:
                    return None
            elif os.path.isfile(name) and filecmp.cmp(name, source, shallow=False):
                return name

    @staticmethod
    def remove_source(source, placed):
        """The last step of a move. A source that cannot be removed (a read-only folder, an
        immutable file) stays where it is, beside its copy, and says so; a rerun tries again.
        From another file system, the copy's folder is flushed to disk first: the two file systems
        write their changes out independently, and a power cut must not find the source's removal
        on disk and not the copy's name."""
        try:
            if os.path.lexists(source) and os.stat(source).st_dev != os.stat(placed).st_dev:
                fsync_folder(placed.parent)
            unlink(source)
        except OSError as error:
            raise TransferError(f"copied to {placed}, but the source cannot be removed "
                                f"({error.strerror or error}); rerun to try again") from None

    def step(self):
        """Between two steps of a transfer. Test hook: CITYCLASSIFIER_KILL_AT_TRANSFER_STEP=N makes the
        process SIGKILL itself after the N-th step of the run (tests/test_reliability.py)."""
        self.steps += 1
        if self.steps == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def stage(self, source, hidden):
        """Puts the source's content at `hidden`: a hard link for a move on one file system, else a
        copy flushed to disk. A left-over hidden file (a copy cut short) is made again."""
        if os.path.lexists(hidden):
            os.unlink(hidden)
        if self.move:
            try:
                os.link(source, hidden)
                return
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
        shutil.copy2(source, hidden)
        with open(hidden, "rb+") as f:
            os.fsync(f.fileno())

    def record(self, source, entry):
        """Appends a ledger line: {"dst", "hidden", "id"} when placed; {"placing", "hidden", "id"} before
        a rename; {"dropped": true} when a rename did not happen after all."""
        self.ledger.write(json.dumps({"src": source, **entry}) + "\n")
        self.ledger.flush()
        self.placed[source] = entry


def fsync_folder(folder):
    """Flushes a folder's entries (names made or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def identity(path):
    """What tells one file from another that later took its path: device, inode, size, mtime."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def already_linked(hidden, target, limit):
    """The final name an interrupted run gave the hidden file (the same inode), or None. Names are
    taken in order, so the scan stops after a run of free ones."""
    free = 0
    for name in candidates(target, limit):
        if not os.path.lexists(name):
            free += 1
            if free > 16:
                return None
        elif os.path.samefile(name, hidden):
            return name


def candidates(target, limit):
    """NAME, NAME_1, NAME_2, ... beside `target`, each at most `limit` bytes long (`fit_name`)."""
    yield target
    stem, suffix = target.stem, target.suffix
    if len(os.fsencode(suffix)) > limit // 2:  # no file extension: a dot late in a long name
        stem, suffix = target.name, ""
    n = 1
    while True:
        yield target.with_name(fit_name(stem, f"_{n}{suffix}", limit))
        n += 1


def hidden_name(target, source, limit):
    """`.NAME.<source key>.partial` beside `target`: the staged copy's name, one per source."""
    return target.with_name(fit_name(f".{target.name}", f".{path_key(source) & 0xFFFFFFFFFFFFFFFF:016x}.partial",
                                     limit))


def fit_name(stem, tail, limit):
    """`stem + tail`, whole characters cut off the end of the stem until the name takes at most
    `limit` bytes: a 250-byte name taken in DEST still gets a free one (NAME_MAX is 255 bytes)."""
    room = limit - len(os.fsencode(tail))
    while stem and len(os.fsencode(stem)) > room:
        stem = stem[: max(0, min(len(stem) - 1, room))]  # at most `room` characters, each a byte or more
    return stem + tail


def name_max(folder):
    """The longest file name, in bytes, that `folder`'s file system takes (255 where it does not say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def probe_placing(folder):
    """How files get their final names in `folder`: True (hard links), False (renames that refuse to
    overwrite: no hard links, as on exFAT), or None (neither can be done safely). Tried on two empty
    files of its own; a rename that overwrote the second one counts as none."""
    first, second = (Path(folder) / f".classify-probe-{os.getpid()}-{n}" for n in (1, 2))
    try:
        first.touch()
        try:
            os.link(first, second)
            return True
        except OSError as error:
            if error.errno not in NO_HARD_LINKS:
                raise
        second.touch()
        try:
            rename_noreplace(first, second)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return None
            raise
        return None  # it overwrote
    finally:
        unlink(first)
        unlink(second)


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # no such C function (not glibc >= 2.28, not Linux)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def rename_noreplace(source, target):
    """Renames `source` to `target` unless `target` exists (FileExistsError): renameat2 with
    RENAME_NOREPLACE. OSError EINVAL where the file system or the C library cannot do it."""
    function = _renameat2()
    if function is None:
        raise OSError(errno.EINVAL, "renames that refuse to overwrite are not available here", str(target))
    at_cwd, no_replace = -100, 1  # AT_FDCWD and RENAME_NOREPLACE from <fcntl.h> and <linux/fs.h>
    if function(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), no_replace) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def link_free_name(hidden, target, limit):
    """Links `hidden` to the first name among `candidates(target)` that nobody holds."""
    for name in candidates(target, limit):
        try:
            os.link(hidden, name)
            return name
        except FileExistsError:
            continue


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
