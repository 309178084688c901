#!/usr/bin/env python
"""Scores image collections for chromatic aberration (or any CityClassifier model) and filters them.

  python classify.py PATH... [--out results.jsonl] [--model M ...] [--label L --min P --copy-to DIR]

PATH is an image file, a folder (scanned recursively for image files), or @list.txt (one path per
line). Every input file gets exactly one row: its path, size, each model's score per label
(`<model>:<label>`), each model's top label, and `error` (null when fine, else a one-line reason).

Resumable: rows are appended and flushed per batch; running the same command again skips every
file already in the output (a killed run loses at most its in-flight batches). `.jsonl` output is
written live; for `.csv` and `.parquet` the live rows go to a hidden `.OUT.jsonl` beside it, and the
table is rebuilt from it at the end of each run (keep it to resume).

Filtering (after scoring, over all rows of the output, so rerunning only applies it):
  --label "Chromatic Aberration" --min 0.5 --list             print matching paths
  --label default:Pass --max 0.2 --move-to rejected/ --keep-structure

Several GPUs or hosts: launch the same command with `accelerate launch classify.py ...` or
`torchrun --nproc_per_node N classify.py ...`; each rank scores its share into its own part file,
and rank 0 merges the parts into the output. A `datasets` dataset instead of files:
  python classify.py --dataset DIR_OR_HUB_ID --split train --out scored/   (adds score columns)

Exit status: 0 when every file was scored, 1 when some could not be (they have error rows), 2 for
bad arguments.
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scoring import FileStream, collate
from toolkit import EXIT_OK, EXIT_SOME_FAILED, UsageError, run_cli

DEFAULT_MODEL = str(Path(__file__).resolve().parent)
BASE_COLUMNS = ["path", "width", "height", "error"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders, or @list.txt files")
    parser.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="M",
                        help="model folders or Hub ids (default: the shipped model at the repo root); models "
                             "sharing backbone weights share one backbone pass")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"),
                        help="output file: .jsonl, .csv or .parquet (default: results.jsonl); with --dataset, a "
                             "folder (save_to_disk) or a .parquet file")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="decoding processes (default: min(4, cores)); 0 decodes in the main process")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: all cores for models over 50M parameters, which "
                             "are compute-bound; otherwise the cores the decoding workers leave free, at least 1)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 on CUDA, bfloat16 on CPUs with native bf16, else float32")
    parser.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=None,
                        help="five-crop tiling of large images (default: as each model's processor says)")
    parser.add_argument("--combine", choices=["mean", "median", "max", "min"],
                        help="how tile scores combine (default: as each model's config says)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse images with more pixels, as decompression bombs (default: Pillow's limit)")
    parser.add_argument("--no-resume", action="store_true", help="start the output afresh instead of resuming")
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode large JPEGs at a reduced scale when the scoring downsizes them anyway "
                             "(not bit-exact: scores moved by up to 0.04 with tiling and 0.2 without in the README's "
                             "measurement; a first pass, not for tight thresholds)")
    filters = parser.add_argument_group("filtering")
    filters.add_argument("--label", help="score column to filter on: a label name, or MODEL:LABEL")
    filters.add_argument("--min", type=float, help="keep rows with score >= MIN (default 0.5 when only --label)")
    filters.add_argument("--max", type=float, help="keep rows with score <= MAX")
    filters.add_argument("--list", action="store_true", help="print the matching paths")
    filters.add_argument("--copy-to", type=Path, metavar="DIR", help="copy matching files here (never overwrites)")
    filters.add_argument("--move-to", type=Path, metavar="DIR",
                         help="move matching files here (never overwrites; a file exists in one place at least "
                              "at every moment)")
    filters.add_argument("--keep-structure", action="store_true",
                         help="mirror the source folders under DIR (default: flat)")
    data = parser.add_argument_group("datasets route")
    data.add_argument("--dataset", help="a `datasets` image folder or Hub dataset id, instead of PATHs")
    data.add_argument("--split", default="train", help="its split (default: train)")
    data.add_argument("--image-column", default="image", help="its image column (default: image)")
    args = parser.parse_args(argv)
    if bool(args.paths) == bool(args.dataset):
        parser.error("give PATHs or --dataset (one of them)")
    if args.copy_to and args.move_to:
        parser.error("--copy-to and --move-to exclude each other")
    if (args.list or args.copy_to or args.move_to or args.min is not None or args.max is not None) and not args.label:
        parser.error("filtering needs --label")
    if args.label and args.min is None and args.max is None:
        args.min = 0.5
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    if args.out.suffix not in (".jsonl", ".csv", ".parquet") and not args.dataset:
        parser.error(f"--out {args.out}: use a .jsonl, .csv or .parquet file")
    return args


# ------------------------------------------------------------------------------------------- input


def count_files(paths):
    from scoring import iter_files

    return sum(1 for _ in iter_files(paths))


# ------------------------------------------------------------------------------------------ output


class Journal:
    """Append-only JSONL of result rows: one write and fsync per batch; a torn last line from a
    killed run is cut off when it is opened again."""

    def __init__(self, path, fresh=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        repair_tail(self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, rows):
        if rows:
            self.file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def repair_tail(path):
    """Truncates a file after its last complete line (a write cut short by SIGKILL)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size = f.seek(0, os.SEEK_END)
        step = 1 << 16
        position = size
        while position > 0:
            start = max(0, position - step)
            f.seek(start)
            chunk = f.read(position - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            position = start
        f.truncate(0)


def read_rows(path):
    """Streams rows from a JSONL file, skipping a torn last line."""
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def journal_path(out):
    return out if out.suffix == ".jsonl" else out.with_name(f".{out.name}.jsonl")


def part_path(out, rank, world):
    journal = journal_path(out)
    return journal.with_name(f"{journal.stem}.part{rank}-of-{world}.jsonl")


def done_keys(out):
    """Sorted 64-bit keys of every path already in the output, its journal or its rank parts."""
    from scoring import path_key

    journal = journal_path(out)
    sources = [journal] + sorted(journal.parent.glob(f"{journal.stem}.part*-of-*.jsonl"))
    if not journal.exists() and out.exists() and out.suffix in (".csv", ".parquet"):
        sources.append(out)  # a table whose journal was deleted still counts
    keys = []
    for source in sources:
        if source.suffix == ".jsonl":
            keys += [path_key(row["path"]) for row in read_rows(source)]
        else:
            import pyarrow.csv
            import pyarrow.parquet

            table = pyarrow.parquet.read_table(source, columns=["path"]) if source.suffix == ".parquet" else \
                pyarrow.csv.read_csv(source, convert_options=pyarrow.csv.ConvertOptions(include_columns=["path"]))
            keys += [path_key(p) for p in table.column("path").to_pylist()]
    return np.unique(np.array(keys, dtype=np.int64))


def merge_parts(out, world):
    """Appends each rank's part to the journal (a path once), then removes the parts."""
    from scoring import path_key

    journal = Journal(journal_path(out))
    seen = set(path_key(row["path"]) for row in read_rows(journal.path))
    for part in sorted(journal.path.parent.glob(f"{journal.path.stem}.part*-of-*.jsonl")):
        batch = []
        for row in read_rows(part):
            key = path_key(row["path"])
            if key not in seen:
                seen.add(key)
                batch.append(row)
            if len(batch) >= 10000:
                journal.write(batch)
                batch = []
        journal.write(batch)
        part.unlink()
    journal.close()


def write_table(out, columns):
    """Rebuilds OUT.csv / OUT.parquet from the journal, streaming, via a temporary file."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    journal = journal_path(out)
    fields = [pa.field("path", pa.string()), pa.field("width", pa.int64()), pa.field("height", pa.int64()),
              pa.field("error", pa.string())]
    fields += [pa.field(c, pa.string() if c.endswith(":top_label") else pa.float64()) for c in columns]
    schema = pa.schema(fields)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = pa.parquet.ParquetWriter(tmp, schema) if out.suffix == ".parquet" else pa.csv.CSVWriter(tmp, schema)
    batch = []

    def flush():
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch.clear()

    for row in read_rows(journal):
        batch.append({name: row.get(name) for name in schema.names})
        if len(batch) >= 10000:
            flush()
    flush()
    writer.close()
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------- filters


def resolve_label(spec, columns):
    if spec in columns:
        return spec
    matches = [c for c in columns if c.split(":", 1)[1] == spec and not c.endswith(":top_label")]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(repr(c) for c in columns if not c.endswith(":top_label"))
    if not matches:
        raise UsageError(f"--label {spec!r}: no such score column (have {choices})")
    raise UsageError(f"--label {spec!r} is ambiguous: name the model, one of {', '.join(matches)}")


def transfer(source, dest_dir, relative, move):
    """Copies or moves `source` to dest_dir/relative without overwriting: a taken name gets _1, _2...
    A move places the file (a hard link, or a copy on another file system) before it removes the
    source, so a crash at any moment leaves the file in one place at least. Returns the destination."""
    dest = dest_dir / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = dest.stem, dest.suffix
    for n in itertools.count(1):
        if dest.exists() and same_file_content(source, dest):
            break  # placed by an earlier, interrupted run
        if place(source, dest, link=move):
            break
        dest = dest.with_name(f"{stem}_{n}{suffix}")
    if move:
        os.unlink(source)
    return dest


def place(source, dest, link):
    """Puts `source` at `dest` unless `dest` exists (then False); never overwrites, never leaves a
    half-written `dest`."""
    if link:
        try:
            os.link(source, dest)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # another file system: copy instead
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.copy2(source, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, dest)  # exclusive, unlike a rename
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def same_file_content(a, b):
    try:
        if os.path.samefile(a, b):
            return True
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def apply_filters(args, columns):
    from scoring import root_of

    column = resolve_label(args.label, columns)
    matched = transferred = missing = 0
    for row in read_rows(journal_path(args.out)):
        score = row.get(column)
        if score is None or (args.min is not None and score < args.min) or (args.max is not None and score > args.max):
            continue
        matched += 1
        if args.list:
            print(row["path"])
        target = args.copy_to or args.move_to
        if target:
            source = Path(row["path"])
            if not source.exists():
                missing += 1  # moved by an earlier run, or gone
                continue
            relative = source.relative_to(root_of(source, args.paths)) if args.keep_structure else Path(source.name)
            transfer(source, target, relative, move=bool(args.move_to))
            transferred += 1
    verb = "moved" if args.move_to else "copied"
    summary = f"{matched} file(s) with {column} in [{args.min}, {args.max}]"
    if args.copy_to or args.move_to:
        summary += f"; {transferred} {verb} to {args.copy_to or args.move_to}"
        summary += f", {missing} no longer at their path" if missing else ""
    print(summary, file=sys.stderr)


# ------------------------------------------------------------------------------------------- main


def distributed():
    """(rank, world size) under torchrun / accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def cpu_threads(scorer, workers):
    """Small models are decode-bound: oversubscribing 2 cores with 2 decoders and 2 model threads
    cost 25% here (measured: 30 vs 22 img/s); big ones are compute-bound and want every core."""
    cores = os.cpu_count() or 1
    if max(m.model.num_parameters() for m in scorer.models) > 50_000_000:
        return cores
    return max(1, cores - workers)


def score_files(args, scorer):
    from tqdm import tqdm

    rank, world = distributed()
    if world > 1 and args.device == "auto" and torch.cuda.is_available():
        scorer_device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(scorer_device)
        for m in scorer.models:
            m.model.to(scorer_device)
        scorer.device = scorer_device
    if args.no_resume and rank == 0:
        for path in [journal_path(args.out), *journal_path(args.out).parent.glob(
                f"{journal_path(args.out).stem}.part*-of-*.jsonl")]:
            path.unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()
    if scorer.device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads(scorer, args.workers))
    done = done_keys(args.out)
    total = max(0, (count_files(args.paths) - len(done)) // world) if rank == 0 else None
    journal = Journal(part_path(args.out, rank, world) if world > 1 else journal_path(args.out))
    stream = FileStream(args.paths, scorer, done, rank, world, args.max_pixels, args.fast_decode)
    loader = torch.utils.data.DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=scorer.device.type == "cuda",
                                         prefetch_factor=4 if args.workers else None)
    scored = failed = 0
    start = time.time()
    with tqdm(total=total, unit="img", desc="scoring", disable=rank != 0, dynamic_ncols=True) as bar:
        for metas, grouped in loader:
            scores = iter(scorer.score(grouped) if grouped else [])
            rows = []
            for meta in metas:
                row = dict(meta)
                if meta["error"] is None:
                    row.update(next(scores))
                    scored += 1
                else:
                    failed += 1
                    tqdm.write(f"error: {meta['path']}: {meta['error']}", file=sys.stderr)
                rows.append(row)
            journal.write(rows)
            bar.update(len(metas))
    journal.close()
    if world > 1:
        on = scorer.device if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces on GPUs only
        totals = torch.tensor([scored, failed], device=on)
        torch.distributed.all_reduce(totals)
        scored, failed = totals.tolist()
        torch.distributed.barrier()
    if rank == 0:
        if world > 1:
            merge_parts(args.out, world)
        if args.out.suffix in (".csv", ".parquet"):
            write_table(args.out, scorer.columns())
        seconds = time.time() - start
        rate = (scored + failed) / seconds if seconds > 0 else 0.0
        print(f"{scored} scored, {failed} failed in {seconds:.1f}s ({rate:.2f} img/s) -> {args.out}", file=sys.stderr)
    return rank, failed


def score_dataset(args, scorer):
    """Adds the score columns to a `datasets` split with Dataset.map(batched=True)."""
    import datasets

    from scoring import BadImage, first_line

    local = Path(args.dataset)
    ds = datasets.load_dataset("imagefolder", data_dir=str(local), split=args.split) if local.is_dir() else \
        datasets.load_dataset(args.dataset, split=args.split)
    if args.image_column not in ds.column_names:
        raise UsageError(f"{args.dataset}: no column {args.image_column!r} (has {', '.join(ds.column_names)})")
    columns = scorer.columns()

    def add_scores(batch):
        out = {name: [] for name in ["error", *columns]}
        inputs, positions = [], []
        for i, image in enumerate(batch[args.image_column]):
            try:
                if image is None:
                    raise BadImage("no image")
                inputs.append(scorer.preprocess(image))
                positions.append(i)
                out["error"].append(None)
            except Exception as error:  # noqa: BLE001 - an error row, never a crash
                out["error"].append(str(error) if isinstance(error, BadImage) else first_line(error))
        rows = [{} for _ in batch[args.image_column]]
        if inputs:
            _, grouped = collate([(None, x) for x in inputs])
            for i, scores in zip(positions, scorer.score(grouped)):
                rows[i] = scores
        for name in columns:
            out[name] = [row.get(name) for row in rows]
        return out

    scored = ds.map(add_scores, batched=True, batch_size=args.batch_size, desc="scoring")
    if args.out.suffix == ".parquet":
        scored.to_parquet(str(args.out))
    else:
        scored.save_to_disk(str(args.out))
    failed = sum(error is not None for error in scored["error"])
    print(f"{len(scored) - failed} scored, {failed} failed -> {args.out}", file=sys.stderr)
    return 0, failed


def main(argv=None):
    from scoring import Scorer

    args = parse_args(argv)
    for path in args.paths:
        if path.startswith("@") and not os.path.isfile(path[1:]):
            raise UsageError(f"{path[1:]}: list file not found")
        if not path.startswith("@") and not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or folder")
    try:
        scorer = Scorer(args.model, device=args.device, dtype=args.dtype, tiling=args.tiling, combine=args.combine)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.label:
        resolve_label(args.label, scorer.columns())  # fail before hours of scoring, not after
    if args.dataset:
        rank, failed = score_dataset(args, scorer)
    else:
        rank, failed = score_files(args, scorer)
        if rank == 0 and args.label:
            apply_filters(args, scorer.columns())
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    run_cli(main)
