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
"""

import errno
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

from results_store import repair_tail
from scoring import path_key
from toolkit import UsageError

LEDGER = ".classify-transfers.jsonl"


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
            probe = self.dest / f".classify-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise UsageError(f"{self.dest}: cannot write there ({error.strerror or error})") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{self.dest}: another process is copying or moving files into it; wait for it") from None
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
                        placed[record.pop("src")] = record
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # not a ledger line: that transfer, if any, is finished from its hidden name
        return placed

    def close(self):
        self.ledger.close()
        os.close(self.lock_fd)

    def transfer(self, source, relative):
        """Copies or moves `source` to DEST/relative (or NAME_n beside it). Returns (destination,
        whether this call placed it); raises TransferError with a one-line reason."""
        source = str(source)
        target = self.dest / relative
        hidden = target.with_name(f".{target.name}.{path_key(source) & 0xFFFFFFFFFFFFFFFF:016x}.partial")
        done = self.placed.get(source)
        placed = None
        try:
            if done is not None and os.path.lexists(done["dst"]):
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
            if os.path.lexists(hidden):
                placed = already_linked(hidden, target)
            if placed is None:
                self.stage(source, hidden)
                self.step()
                placed = link_free_name(hidden, target)
                self.step()
            self.record(source, placed, hidden)
            self.step()
            os.unlink(hidden)
            self.step()
            if self.move:
                self.remove_source(source, placed)
                self.step()
        except OSError as error:
            if placed is None and os.path.lexists(hidden):
                unlink(hidden)  # not linked anywhere yet: the source is still whole
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
                raise UsageError(f"{target}: cannot write ({error.strerror}); nothing was lost: make room and "
                                 "rerun to finish") from None
            raise TransferError(f"{error.strerror or error}") from None
        return placed, True

    @staticmethod
    def remove_source(source, placed):
        """The last step of a move. A source that cannot be removed (a read-only folder, an
        immutable file) stays where it is, beside its copy, and says so; a rerun tries again."""
        try:
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

    def record(self, source, placed, hidden):
        entry = {"dst": str(placed), "hidden": str(hidden), "id": identity(source)}
        self.ledger.write(json.dumps({"src": source, **entry}) + "\n")
        self.ledger.flush()
        self.placed[source] = entry


def identity(path):
    """What tells one file from another that later took its path: device, inode, size, mtime."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def already_linked(hidden, target):
    """The final name an interrupted run gave the hidden file (the same inode), or None. Names are
    taken in order, so the scan stops after a run of free ones."""
    free = 0
    for name in candidates(target):
        if not os.path.lexists(name):
            free += 1
            if free > 16:
                return None
        elif os.path.samefile(name, hidden):
            return name


def candidates(target):
    """NAME, NAME_1, NAME_2, ... beside `target`."""
    yield target
    n = 1
    while True:
        yield target.with_name(f"{target.stem}_{n}{target.suffix}")
        n += 1


def link_free_name(hidden, target):
    """Links `hidden` to the first name among `candidates(target)` that nobody holds."""
    for name in candidates(target):
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
