"""classify.py's work: scoring files into a resumable output, then the filters (--list, --copy-to,
--move-to). Its command line and help: citytools/cli/classify_args.py, which classify.py parses
before this module (and torch) is imported."""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from citytools.cli.classify_args import parse_args
from citytools.devices import InFlight, default_batch_size, default_workers, model_threads
from citytools.discovery import iter_files, path_key
from citytools.loading import (
    FileStream,
    Stopwatch,
    WorkerMarkers,
    file_stamp,
    hold_for_kill,
    is_done,
    loader_batches,
    preprocess_each,
)
from citytools.results import ResultsStore, column_label, display_text, file_row, is_top_label
from citytools.toolkit import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    UsageError,
    first_line,
    labels_from_folders,
    load_dataset,
)
from citytools.transfers import SourceGone, TransferError, Transfers, inside

# ----------------------------------------------------------------------------------------- filters


def resolve_label(spec, columns):
    if spec in columns:
        return spec
    matches = [c for c in columns if column_label(c) == spec and not is_top_label(c)]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(repr(c) for c in columns if not is_top_label(c))
    if not matches:
        raise UsageError(f"--label {spec!r}: no such score column (have {choices})")
    raise UsageError(f"--label {spec!r} is ambiguous: name the model, one of {', '.join(matches)}")


def check_destination(args):
    """A --move-to/--copy-to folder may lie inside an input folder (it is then left out of the
    walk), never be one or hold one: the files placed there would be scored and moved again."""
    dest = args.copy_to or args.move_to
    if not dest:
        return
    flag = "--move-to" if args.move_to else "--copy-to"
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{flag} {dest}: exists and is not a folder")
    for arg in args.paths:
        if not arg.startswith("@") and os.path.isdir(arg) and inside(arg, dest):
            raise UsageError(f"{flag} {dest}: {'is' if inside(dest, arg) else 'holds'} the input folder {arg}; "
                             "choose a folder outside it, or a subfolder of it")


def excluded_folders(args):
    """os.stat identities of the transfer destination, which the walk leaves out."""
    from citytools.discovery import folder_identity

    dest = args.copy_to or args.move_to
    return {folder_identity(dest)} if dest and dest.is_dir() else set()


def print_path(path):
    """Prints a path for scripts (`--list | xargs`): the file name's own bytes, whatever its encoding."""
    sys.stdout.flush()
    sys.stdout.buffer.write(os.fsencode(path) + b"\n")
    sys.stdout.buffer.flush()


def apply_filters(args, columns, store, transfers):
    """--list / --copy-to / --move-to over every row of the output. Returns how many files failed."""
    from citytools.discovery import root_of

    column = resolve_label(args.label, columns)
    target = args.copy_to or args.move_to
    matched = placed = earlier = missing = failed = 0
    verb = "moved" if args.move_to else "copied"
    for row in store.rows():
        score = row.get(column)
        if score is None or (args.min is not None and score < args.min) or \
                (args.max is not None and score > args.max):
            continue
        matched += 1
        if args.list:
            print_path(row["path"])
        if transfers is None:
            continue
        source = Path(row["path"])
        if inside(source, target):
            earlier += 1  # already in the destination
            continue
        if changed_since_scored(row):
            failed += 1
            print(f"error: {display_text(str(source))}: not {verb}: changed since it was scored (size or modification "
                  "time); score it again (--no-resume, or another --out) before filtering", file=sys.stderr)
            continue
        relative = source.relative_to(root_of(source, args.paths)) if args.keep_structure else Path(source.name)
        try:
            _, now = transfers.transfer(source, relative)
            placed += now
            earlier += not now
        except SourceGone:
            missing += 1
        except TransferError as error:
            failed += 1
            print(f"error: {display_text(str(source))}: not {verb}: {error}", file=sys.stderr)
    summary = f"{matched} file(s) with {column} in [{args.min}, {args.max}]"
    if target:
        summary += f"; {placed} {verb} to {target}"
        summary += f", {earlier} {verb} there earlier" if earlier else ""
        summary += f", {missing} no longer at their path" if missing else ""
        summary += f", {failed} failed" if failed else ""
    print(summary, file=sys.stderr)
    return failed


def changed_since_scored(row):
    """Whether the file at the row's path is no longer the one its scores are of: another size or
    modification time than when it was decoded (rows of older outputs have neither: not checked; a
    file gone is the transfer's to report)."""
    scored = {"file_size": row.get("file_size"), "modified": row.get("modified")}
    now = file_stamp(row["path"])
    return None not in scored.values() and None not in now.values() and now != scored


# ------------------------------------------------------------------------------------------- main


def distributed():
    """(rank, world size) under torchrun / accelerate launch, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def rank_device(device, world):
    """--device for this process: under torchrun with --device auto and GPUs, one GPU per local rank."""
    if world > 1 and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def score_files(args, scorer, store):
    """Scores every input file not yet in the output. Returns (rank, failed files in the whole output)."""
    rank, world = distributed()
    if scorer.device.type == "cpu":
        torch.set_num_threads(args.threads or model_threads(max(m.model.num_parameters() for m in scorer.models),
                                                            args.workers))
    done, old_errors = store.done()
    exclude = excluded_folders(args)
    total = pending_count(args, done, exclude, world) if rank == 0 else None
    journal = store.writer(rank, world)
    start, stopwatch = time.time(), Stopwatch()
    with tqdm(total=total, unit="img", desc="scoring", disable=rank != 0, dynamic_ncols=True) as bar:
        scored, failed = score_stream(args, scorer, store, done, exclude, journal, bar, rank, world, stopwatch)
    journal.close()
    if world > 1:
        scored, failed = gather_counts(scorer, scored, failed)
    if rank == 0:
        if world > 1:
            store.merge_parts()
        with stopwatch("table"):
            store.write_table(scorer.columns())
        seconds = time.time() - start
        rate = (scored + failed) / seconds if seconds > 0 else 0.0
        print(f"{scored} scored, {failed} failed in {seconds:.1f}s ({rate:.2f} img/s) -> {args.out}", file=sys.stderr)
        print(f"time: {stopwatch.line()}", file=sys.stderr)
        hint = decoding_hint(stopwatch, seconds, scorer.device, args.workers)
        if hint:
            print(hint, file=sys.stderr)
        if old_errors:
            print(f"{old_errors} file(s) in {args.out} failed in earlier runs (rows with an error)", file=sys.stderr)
    return rank, failed + old_errors


def decoding_hint(stopwatch, seconds, device, workers):
    """A note when the model waited for decoded images over half of a run longer than 10 s (shorter
    runs are mostly start-up), saying what may help; else None."""
    waiting = stopwatch.seconds.get("waiting_for_images", 0.0)
    if seconds <= 10 or waiting <= seconds / 2:
        return None
    more = "more --workers, or --crop-on device, may" if device.type == "cuda" else "more --workers may"
    return (f"note: the model waited for decoded images {waiting / seconds:.0%} of the time: decoding is the limit "
            f"here ({workers} workers, {os.cpu_count()} cores); {more} help")


def pending_count(args, done, exclude, world):
    """The progress bar's total: input files not in the output yet, each counted once (notes printed)."""
    notice = lambda text: print(f"note: {display_text(text)}", file=sys.stderr)  # noqa: E731
    keys = {path_key(path) for path in iter_files(args.paths, exclude, notice)}
    return sum(not is_done(done, key) for key in keys) // world


def score_stream(args, scorer, store, done, exclude, journal, bar, rank, world, stopwatch):
    """Decodes and scores this rank's share of the files not in `done` into `journal`; a decoding
    worker that dies (killed by the kernel) costs its file an error row and the loader restarts
    without the files written so far. Returns (scored, failed); `stopwatch` (citytools.loading.Stopwatch)
    gets the time each phase took."""
    scored = failed = deaths = 0
    in_flight = InFlight()  # the batch whose scores are on their way: written once the next one is queued
    on_gpu = scorer.device.type == "cuda"  # its work is queued: batches go as soon as it is idle

    def finish(batch):
        nonlocal scored, failed
        if batch is None:
            return
        with stopwatch("model"):
            rows, ok, bad = batch()
        with stopwatch("writing"):
            journal.write(rows)
        scored, failed = scored + ok, failed + bad
        bar.update(len(rows))
        hold_for_kill(scored + failed)

    def warm_up():
        if on_gpu:
            with stopwatch("warm_up"):
                scorer.warm_up()

    with tempfile.TemporaryDirectory(prefix="classify-workers-") as marker_dir:
        markers = WorkerMarkers(marker_dir)
        while True:
            stream = FileStream(args.paths, scorer, done, rank, world, args.max_pixels, args.fast_decode, exclude,
                                markers)
            batches = loader_batches(stream, args.batch_size, args.workers, scorer.device, on_start=warm_up,
                                     idle=in_flight.idle if on_gpu else None)
            try:
                for metas, grouped in stopwatch.timed(batches, "first_batch", "waiting_for_images"):
                    with stopwatch("model"):
                        started = submit_batch(scorer, metas, grouped)  # a GPU scores it while the last is written
                    finish(in_flight.swap(started))
                finish(in_flight.take())
                return scored, failed
            except (RuntimeError, ConnectionError) as error:  # a worker killed mid-handover resets its socket
                if isinstance(error, RuntimeError) and "DataLoader worker" not in str(error):
                    raise
                finish(in_flight.take())  # scored before the death: written before the files done are read back
                rows = death_rows(markers, error)
                deaths += not rows
                if deaths > 2:
                    raise UsageError(f"decoding processes keep dying without a file to blame ({first_line(error)}); "
                                     "try --workers 0 or a lower --max-pixels") from None
                journal.write(rows)
                failed += len(rows)
                bar.update(len(rows))
                del batches
                done = store.done()[0]  # what this rank wrote so far is skipped by the new workers


def death_rows(markers, error):
    """Error rows (printed too) for the files that decoding workers were on when they died."""
    rows = [file_row(path, reason) for path, reason in markers.culprits(error).items()]
    for row in rows:
        tqdm.write(f"error: {display_text(row['path'])}: {row['error']}", file=sys.stderr)
    return rows


def gather_counts(scorer, scored, failed):
    """(scored, failed) summed over all ranks."""
    on = scorer.device if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces on GPUs only
    totals = torch.tensor([scored, failed], device=on)
    torch.distributed.all_reduce(totals)
    torch.distributed.barrier()
    return tuple(totals.tolist())


class BatchInFlight:
    """One batch from the loader, its scores on their way (see `Scorer.submit`): called, it waits for
    them and returns (rows, scored, failed), printing the error rows; `done()` does not wait."""

    def __init__(self, metas, scores):
        self.metas, self.scores = metas, scores

    def done(self):
        return self.scores is None or self.scores.done()

    def __call__(self):
        return batch_rows(self.metas, self.scores() if self.scores is not None else [])


def submit_batch(scorer, metas, grouped):
    """Starts scoring one batch from the loader -> its `BatchInFlight`."""
    return BatchInFlight(metas, scorer.submit(grouped) if grouped else None)  # None: undecodable files only


def batch_rows(metas, scored_rows):
    """(rows, scored, failed): the batch's metas, with the scores of those that decoded."""
    scores = iter(scored_rows)
    rows, scored, failed = [], 0, 0
    for meta in metas:
        row = dict(meta)
        if meta["error"] is None:
            row.update(next(scores))
            scored += 1
        else:
            failed += 1
            tqdm.write(f"error: {display_text(meta['path'])}: {meta['error']}", file=sys.stderr)
        rows.append(row)
    return rows, scored, failed


def score_dataset(args, scorer):
    """Adds the score columns to a `datasets` split with Dataset.map(batched=True)."""
    import datasets

    from citytools.images import BadImage, load_dataset_image, load_image

    ds = load_dataset(args.dataset, split=args.split)
    if args.image_column not in ds.column_names:
        raise UsageError(f"{args.dataset}: no column {args.image_column!r} (has {', '.join(ds.column_names)})")
    feature = ds.features[args.image_column]
    if isinstance(feature, datasets.Image):  # decoded here, one image at a time: a bad one is an error row
        ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
        if os.path.isdir(args.dataset) and "label" not in ds.column_names:  # a metadata.csv hid the folder labels
            labels = labels_from_folders(ds[args.image_column])
            if all(label is not None for label in labels):
                ds = ds.add_column("label", labels)
    columns = scorer.columns()
    work_pixels = scorer.work_pixels

    def open_image(value):
        if value is None:
            raise BadImage("no image")
        if isinstance(value, dict):
            return load_dataset_image(value, args.max_pixels, work_pixels)
        return load_image(value, args.max_pixels, work_pixels=work_pixels) if isinstance(value, str) else value

    def add_scores(batch):
        values = batch[args.image_column]
        good, grouped, errors = preprocess_each(values, lambda value: scorer.preprocess(open_image(value)))
        rows = [{} for _ in values]
        for i, scores in zip(good, scorer.score(grouped) if grouped else []):
            rows[i] = scores
        return {"error": [errors.get(i) for i in range(len(values))],
                **{name: [row.get(name) for row in rows] for name in columns}}

    scored = ds.map(add_scores, batched=True, batch_size=args.batch_size, desc="scoring")
    if isinstance(feature, datasets.Image):
        scored = scored.cast_column(args.image_column, feature)  # saved as it came: decoded on access
    if args.out.suffix == ".parquet":
        scored.to_parquet(str(args.out))
    else:
        scored.save_to_disk(str(args.out))
    failed = sum(error is not None for error in scored["error"])
    print(f"{len(scored) - failed} scored, {failed} failed -> {args.out}", file=sys.stderr)
    return 0, failed


def main(argv=None):
    from citytools.scorer import Scorer

    args = parse_args(argv)
    for path in args.paths:
        if path.startswith("@") and not os.path.isfile(path[1:]):
            raise UsageError(f"{path[1:]}: list file not found")
        if not path.startswith("@") and not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or folder")
    check_destination(args)
    rank, world = distributed() if not args.dataset else (0, 1)
    try:
        scorer = Scorer(args.model, device=rank_device(args.device, world), dtype=args.dtype, tiling=args.tiling,
                        combine=args.combine, crop=args.crop_on, tiling_mode=args.tiling_mode)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.label:
        resolve_label(args.label, scorer.columns())  # fail before hours of scoring, not after
    if args.workers is None:
        args.workers = default_workers(scorer.device)
    if args.batch_size is None:
        args.batch_size = min(default_batch_size(scorer.device, m.model) for m in scorer.models)
    if args.dataset:
        return EXIT_SOME_FAILED if score_dataset(args, scorer)[1] else EXIT_OK
    store = ResultsStore(args.out)
    refused = transfers = None
    if rank == 0:
        try:
            store.lock()  # a second process on this output stops here, before it writes anything
            store.start(dict(scorer.setup(), fast_decode=args.fast_decode), fresh=args.no_resume)
            if args.copy_to or args.move_to:  # its lock, and a destination that cannot work, before the scoring
                transfers = Transfers(args.copy_to or args.move_to, move=bool(args.move_to))
        except UsageError as error:
            refused = error
    if world > 1:
        flag = torch.tensor([refused is not None], dtype=torch.int32,
                            device=scorer.device if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(flag)
        if flag.item() and rank != 0:
            return EXIT_USAGE  # rank 0 says why
    if refused is not None:
        store.close()
        raise refused
    try:
        rank, failed = score_files(args, scorer, store)
        if rank == 0 and args.label:
            failed += apply_filters(args, scorer.columns(), store, transfers)
    finally:
        if transfers is not None:
            transfers.close()
        store.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK
