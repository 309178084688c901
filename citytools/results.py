"""Where classify.py keeps its rows: an append-only JSONL journal, per-rank parts, a record of the
setup that scored them, and a lock so that one process at a time writes an output.

For `OUT.jsonl` the journal is the output itself. For `OUT.csv` / `OUT.parquet` the rows go to a
hidden `.OUT.csv.jsonl` beside it and the table is rebuilt from it at the end of each run. Beside
the output live `.OUT.lock` (the writer's lock, kept) and `.OUT.setup.json` (what scored the rows).

Guarantees, each tested in tests/test_reliability.py:
- a row is written whole or not at all: a batch that fails to write (full disk, a signal) is cut
  back off, and a line torn by SIGKILL is cut off when the journal is opened again;
- a path is in the output once: resume skips every path already there, parts merge by path;
- rows from one setup only: a rerun with another model, weights, tiling or combine is refused;
- one writer: a second process on the same output is refused (exit 2) while the first runs;
- a table whose journal was deleted is read back into a new journal, never wiped;
- a file at the output's path that is not a classify.py output (no `path` column) is never
  written over, not even with --no-resume.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np

from citytools.toolkit import UsageError, first_line, lock_exclusive, release_lock

# The output row, one per input file: these columns (name -> arrow type), then each model's score
# columns: `<model>:<label>` (float) per label, then `<model>:top_label` (string; see score_columns).
FILE_COLUMNS = {"path": "string", "width": "int64", "height": "int64", "error": "string", "file_size": "int64",
                "modified": "int64"}
STRING_COLUMNS = ("path", "error")  # may hold text that is not UTF-8 (file names): see encode_row
TOP_LABEL = "top_label"


def file_row(path, error=None, width=None, height=None, file_size=None, modified=None):
    """The file columns of one row: width/height as stored (pixels), file_size in bytes, modified in
    st_mtime_ns, error a one-line reason or None."""
    return {"path": path, "width": width, "height": height, "error": error, "file_size": file_size,
            "modified": modified}


def score_columns(model_key, labels):
    """A model's score columns, in output order: one per label, then its top label."""
    return [f"{model_key}:{label}" for label in labels] + [f"{model_key}:{TOP_LABEL}"]


def is_top_label(column):
    return column.endswith(f":{TOP_LABEL}")


def column_label(column):
    """`<model>:<label>` -> label (model keys hold no colon; labels may)."""
    return column.split(":", 1)[1]


class OutputError(UsageError):
    """The output cannot be written (read-only, a folder, disk full): one line, exit status 2."""


def journal_path(out):
    return out if out.suffix == ".jsonl" else out.with_name(f".{out.name}.jsonl")


def encode_row(row):
    """One JSONL line as bytes. File names that are not valid UTF-8 (Python's surrogate escapes)
    are written as JSON \\udcXX escapes, which read back to the same name; other rows stay readable."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


def display_text(text):
    """A string that any UTF-8 consumer (CSV, Parquet, a terminal) takes: undecodable bytes of a
    file name become \\xNN."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_rows(path):
    """Streams rows from a JSONL file, skipping a torn last line."""
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def repair_tail(path):
    """Truncates a file after its last complete line (a write cut short by SIGKILL)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        position = f.seek(0, os.SEEK_END)
        while position > 0:
            start = max(0, position - (1 << 16))
            f.seek(start)
            cut = f.read(position - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            position = start
        f.truncate(0)


class Journal:
    """Append-only JSONL of rows: one write and fsync per batch. A batch that cannot be written
    whole (disk full, an exception raised by a signal handler mid-write) is cut back off, so the
    file only ever ends after a complete row."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_tail(self.path)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            raise OutputError(f"{self.path}: cannot write ({error.strerror or error})") from None

    def write(self, rows):
        if not rows:
            return
        data = b"".join(encode_row(row) for row in rows)
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except BaseException as error:
            os.ftruncate(self.fd, start)
            if isinstance(error, OSError):
                raise OutputError(f"{self.path}: cannot write ({error.strerror or error}); the rows written so far "
                                  "are kept: make room and rerun to resume") from None
            raise

    def write_all(self, rows, batch=10000):
        """Writes an iterable of rows, `batch` at a time (whole batches, as `write`)."""
        pending = []
        for row in rows:
            pending.append(row)
            if len(pending) >= batch:
                self.write(pending)
                pending = []
        self.write(pending)

    def close(self):
        os.close(self.fd)


class ResultsStore:
    """The rows of one output: resume keys, the setup check, rank parts, the table. `key` is the column
    that names a row's input (`path` for files; `key` for dataset samples), `columns` the columns before
    the scores (name -> arrow type name, or a pyarrow type)."""

    def __init__(self, out, key="path", columns=None):
        self.out = Path(out)
        self.key, self.columns = key, dict(columns or FILE_COLUMNS)
        self.journal = journal_path(self.out)
        self.setup_path = self.out.with_name(f".{self.out.name}.setup.json")
        self.lock_path = self.out.with_name(f".{self.out.name}.lock")
        self.lock_fd = None

    # ------------------------------------------------------------------------------ lock and setup

    def lock(self):
        """Takes the output's lock for this process (released when it exits, however it exits), after
        refusing an existing output that classify.py did not write (`foreign`)."""
        if self.out.is_dir():
            raise OutputError(f"{self.out}: is a folder; --out takes a .jsonl, .csv or .parquet file")
        reason = self.foreign()
        if reason:  # refused before anything is written beside it, the lock file included
            raise UsageError(f"{self.out}: exists and is not a classify.py output ({reason}); it is left as it is: "
                             "choose another --out")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"{self.out}: cannot write here ({error.strerror or error})") from None
        try:
            lock_exclusive(self.lock_fd)
        except BlockingIOError:
            holder = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(f"{self.out}: another process (pid {holder}) is writing this output; wait for it "
                              "or choose another --out") from None
        except OSError as error:  # a file system without locks (some network and FUSE mounts)
            raise OutputError(f"{self.out}: cannot be locked against a second writer ({error.strerror or error}); "
                              "choose an --out on another file system") from None
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)

    def close(self):
        """Releases the lock (the lock file stays: removing it would let two processes lock two files)."""
        if self.lock_fd is not None:
            release_lock(self.lock_fd)
            self.lock_fd = None

    def parts(self):
        return sorted(self.journal.parent.glob(f"{self.journal.stem}.part*-of-*.jsonl"))

    def part_path(self, rank, world):
        return self.journal.with_name(f"{self.journal.stem}.part{rank}-of-{world}.jsonl")

    def has_rows(self):
        return any(p.exists() and p.stat().st_size > 0 for p in [self.journal, *self.parts()])

    def start(self, setup, fresh=False):
        """Prepares the output for a run with `setup` (a JSON-able description of what scores):
        starts afresh, or checks that the rows there were scored with the same setup."""
        if fresh:
            for path in [self.journal, *self.parts(), self.setup_path]:
                path.unlink(missing_ok=True)
        else:
            self.recover_journal()
            if self.has_rows():
                recorded = self.recorded_setup()
                if recorded is None:
                    raise UsageError(f"{self.out}: holds rows but no record of the setup that scored them ("
                                     f"{self.setup_path.name} is missing, or an older classify.py wrote them); "
                                     "rerun with --no-resume to score afresh, or choose another --out")
                if recorded != setup:
                    raise UsageError(f"{self.out}: was scored with another setup ({describe_change(recorded, setup)}); "
                                     "resuming would mix their scores: rerun with --no-resume to score afresh, "
                                     "or choose another --out")
                return
        write_atomic(self.setup_path, json.dumps(setup, indent=1, sort_keys=True) + "\n")

    def foreign(self):
        """Why the file at the output's path is not one that classify.py wrote (so it must not be
        replaced), or None: an empty or missing file, or one whose rows or columns have a `path`."""
        if not self.out.is_file() or self.out.stat().st_size == 0:
            return None
        try:
            if self.out.suffix == ".parquet":
                import pyarrow.parquet

                columns = pyarrow.parquet.read_schema(self.out).names
            elif self.out.suffix == ".csv":
                with open(self.out, newline="", encoding="utf-8", errors="surrogateescape") as f:
                    columns = next(csv.reader(f), [])
            else:
                with open(self.out, encoding="utf-8", errors="surrogateescape") as f:
                    first = f.readline()
                if not first.endswith("\n") and first.startswith('{"path": '):
                    return None  # a first row torn by a kill: classify.py's own
                row = json.loads(first)
                columns = list(row) if isinstance(row, dict) else []
        except Exception as error:  # noqa: BLE001 - whatever it is, it cannot be read as rows
            return f"cannot be read as rows: {first_line(error)}"
        return None if self.key in columns else f"no {self.key!r} column"

    def recorded_setup(self):
        try:
            return json.loads(self.setup_path.read_text())
        except (OSError, ValueError):
            return None

    def recover_journal(self):
        """A table whose hidden journal is gone: read its rows back into a new journal, so that the
        rebuild at the end of the run keeps them (it would otherwise write an empty table)."""
        if self.journal.exists() or self.journal == self.out or not self.out.exists():
            return
        import pyarrow.csv
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(self.out) if self.out.suffix == ".parquet" else \
                pyarrow.csv.read_csv(self.out)
        except Exception as error:  # noqa: BLE001 - a damaged table is the user's to look at, never overwritten
            raise UsageError(f"{self.out}: its journal {self.journal.name} is missing and the table cannot be read "
                             f"back ({first_line(error)}); move it away or rerun with --no-resume") from None
        tmp = self.journal.with_name(f"{self.journal.name}.recovering")
        journal = Journal(tmp)
        journal.write_all(table.to_pylist())
        journal.close()
        os.replace(tmp, self.journal)

    # ----------------------------------------------------------------------------------- reading

    def done(self):
        """(sorted 64-bit keys of every input in the journal and its parts, how many of those rows are errors)."""
        from citytools.discovery import path_key

        keys, errors = [], 0
        for source in [self.journal, *self.parts()]:
            for row in read_rows(source):
                keys.append(path_key(row[self.key]))
                errors += row.get("error") is not None
        return np.unique(np.array(keys, dtype=np.int64)), errors

    def rows(self):
        return read_rows(self.journal)

    # ----------------------------------------------------------------------------------- writing

    def writer(self, rank=0, world=1):
        return Journal(self.part_path(rank, world) if world > 1 else self.journal)

    def merge_parts(self):
        """Appends each rank's part to the journal (an input once), then removes the parts."""
        from citytools.discovery import path_key

        journal = Journal(self.journal)
        seen = set(path_key(row[self.key]) for row in read_rows(self.journal))

        def new_rows(part):
            for row in read_rows(part):
                key = path_key(row[self.key])
                if key not in seen:
                    seen.add(key)
                    yield row

        for part in self.parts():
            journal.write_all(new_rows(part))
            part.unlink()
        journal.close()

    def write_table(self, columns, metadata=None):
        """Rebuilds OUT.csv / OUT.parquet from the journal, streaming, through a temporary file that
        replaces the table only when complete (and is removed when anything fails). `metadata` (JSON-able)
        goes into a parquet file's schema metadata as `cityclassifier`."""
        if self.journal == self.out:
            return
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        fields = [pa.field(name, getattr(pa, kind)() if isinstance(kind, str) else kind)
                  for name, kind in self.columns.items()]
        fields += [pa.field(c, pa.string() if is_top_label(c) else pa.float64()) for c in columns]
        schema = pa.schema(fields, metadata={"cityclassifier": json.dumps(metadata)} if metadata else None)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        try:
            writer = pa.parquet.ParquetWriter(tmp, schema) if self.out.suffix == ".parquet" else \
                pa.csv.CSVWriter(tmp, schema)
            batch = []
            for row in read_rows(self.journal):
                batch.append({name: display_text(row.get(name)) if name in STRING_COLUMNS else row.get(name)
                              for name in schema.names})
                if len(batch) >= 10000:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            writer.close()
            os.replace(tmp, self.out)
        except OSError as error:
            raise OutputError(f"{self.out}: cannot write ({error.strerror or error}); the rows are kept in "
                              f"{self.journal.name}: make room and rerun to rebuild the table") from None
        finally:
            if tmp.exists():
                tmp.unlink()


def write_atomic(path, text):
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from None


def describe_change(old, new):
    """What differs between two setups, in a few words."""
    changes = []
    old_models = {m["key"]: m for m in old.get("models", [])}
    new_models = {m["key"]: m for m in new.get("models", [])}
    if set(old_models) != set(new_models):
        changes.append(f"models {sorted(old_models)} -> {sorted(new_models)}")
    for key in sorted(set(old_models) & set(new_models)):
        for field, value in new_models[key].items():
            if old_models[key].get(field) != value:
                shown = "differ" if field in ("weights", "config", "processor") else \
                    f"{old_models[key].get(field)} -> {value}"
                changes.append(f"{key} {field} {shown}")
    for field in sorted(set(old) | set(new)):
        if field != "models" and old.get(field) != new.get(field):
            changes.append(f"{field} {old.get(field)} -> {new.get(field)}")
    return "; ".join(changes) or "unknown difference"
