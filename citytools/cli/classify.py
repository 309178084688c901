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
)
from citytools.results import ResultsStore, column_label, display_text, file_row, is_top_label
from citytools.toolkit import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    UsageError,
    first_line,
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


class FolderRoute:
    """The files that PATHs name: rows keyed by path (`FileStream`)."""

    def __init__(self, args):
        self.args, self.exclude = args, excluded_folders(args)
        self.store = ResultsStore(args.out)

    def setup(self, scorer):
        return dict(scorer.setup(), fast_decode=self.args.fast_decode)

    def metadata(self, scorer):
        return None

    def total(self, done, world):
        return pending_count(self.args, done, self.exclude, world)

    def stream(self, scorer, done, rank, world, markers):
        args = self.args
        return FileStream(args.paths, scorer, done, rank, world, args.max_pixels, args.fast_decode, self.exclude,
                          markers)

    @staticmethod
    def death_row(path, reason):
        return file_row(path, reason)


class DatasetRoute:
    """The samples of a `datasets` dataset, streamed (citytools/streaming.py): rows keyed by `key`."""

    def __init__(self, args):
        from citytools.streaming import DatasetSource

        self.args = args
        self.source = DatasetSource(args.dataset, args.split, args.data_files, args.image_column, args.id_column,
                                    args.dataset_config)
        columns = dict(self.source.key_columns(), width="int64", height="int64", error="string")
        self.store = ResultsStore(args.out, key="key", columns=columns)

    def setup(self, scorer):
        return dict(scorer.setup(), source=self.source.description())

    def metadata(self, scorer):
        from citytools.hub_scores import scores_metadata

        return scores_metadata(self.args, scorer, self.source)

    def total(self, done, world):
        """The samples left, where the dataset's card says how many it has (a Hub dataset's), else None:
        a stream's length is not known before it is read."""
        count = self.source.count
        return max(0, count - len(done)) // world if count else None

    def stream(self, scorer, done, rank, world, markers):
        from citytools.streaming import SampleStream

        return SampleStream(self.source, scorer, done, rank, world, self.args.max_pixels, markers)

    @staticmethod
    def death_row(text, reason):
        from citytools.streaming import death_row

        return death_row(text, reason)


def score_files(args, scorer, route):
    """Scores every input (file or sample) not yet in the output. Returns (rank, failed inputs in the
    whole output)."""
    store = route.store
    rank, world = distributed()
    if scorer.device.type == "cpu":
        torch.set_num_threads(args.threads or model_threads(max(m.model.num_parameters() for m in scorer.models),
                                                            args.workers))
    done, old_errors = store.done()
    total = route.total(done, world) if rank == 0 else None
    journal = store.writer(rank, world)
    start, stopwatch = time.time(), Stopwatch()
    with tqdm(total=total, unit="img", desc="scoring", disable=rank != 0, dynamic_ncols=True) as bar:
        scored, failed, repeats = score_stream(args, scorer, route, done, journal, bar, rank, world, stopwatch)
    journal.close()
    if world > 1:
        scored, failed = gather_counts(scorer, scored, failed)
    if repeats:
        why = f"is --id-column {args.id_column} unique?" if args.id_column else "a key repeated within its data file"
        print(f"note: {repeats} sample(s) had a key already seen in this run and were scored once ({why})",
              file=sys.stderr)
    if rank == 0:
        if world > 1:
            store.merge_parts()
        with stopwatch("table"):
            store.write_table(scorer.columns(), route.metadata(scorer))
        seconds = time.time() - start
        rate = (scored + failed) / seconds if seconds > 0 else 0.0
        print(f"{scored} scored, {failed} failed in {seconds:.1f}s ({rate:.2f} img/s) -> {args.out}", file=sys.stderr)
        print(f"time: {stopwatch.line()}", file=sys.stderr)
        hint = decoding_hint(stopwatch, seconds, scorer.device, args.workers)
        if hint:
            print(hint, file=sys.stderr)
        if old_errors:
            print(f"{old_errors} input(s) in {args.out} failed in earlier runs (rows with an error)", file=sys.stderr)
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


def score_stream(args, scorer, route, done, journal, bar, rank, world, stopwatch):
    """Decodes and scores this rank's share of the inputs not in `done` into `journal`; a decoding
    worker that dies (killed by the kernel) costs its input an error row and the loader restarts
    without the inputs written so far. Returns (scored, failed, keys met twice in the run and skipped);
    `stopwatch` (citytools.loading.Stopwatch) gets the time each phase took."""
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
            stream = route.stream(scorer, done, rank, world, markers)
            batches = loader_batches(stream, args.batch_size, args.workers, scorer.device, on_start=warm_up,
                                     idle=in_flight.idle if on_gpu else None)
            try:
                for metas, grouped in stopwatch.timed(batches, "first_batch", "waiting_for_images"):
                    with stopwatch("model"):
                        started = submit_batch(scorer, metas, grouped)  # a GPU scores it while the last is written
                    finish(in_flight.swap(started))
                finish(in_flight.take())
                return scored, failed, getattr(stream, "repeats", 0)
            except UsageError:  # the input cannot be read on (a shard out of reach): what was scored is kept
                finish(in_flight.take())
                raise
            except (RuntimeError, ConnectionError, EOFError) as error:
                # a worker killed mid-handover resets its socket (ConnectionError), or closes it while
                # the main process is still asking for the batch's shared memory (EOFError: seen under load)
                if isinstance(error, RuntimeError) and "DataLoader worker" not in str(error):
                    raise
                finish(in_flight.take())  # scored before the death: written before the inputs done are read back
                rows = death_rows(markers, error, route.death_row)
                deaths += not rows
                if deaths > 2:
                    raise UsageError(f"decoding processes keep dying without an input to blame ({first_line(error)}); "
                                     "try --workers 0 or a lower --max-pixels") from None
                journal.write(rows)
                failed += len(rows)
                bar.update(len(rows))
                del batches
                done = route.store.done()[0]  # what this rank wrote so far is skipped by the new workers


def death_rows(markers, error, make_row):
    """Error rows (printed too) for the inputs that decoding workers were on when they died."""
    rows = [make_row(text, reason) for text, reason in markers.culprits(error).items()]
    for row in rows:
        tqdm.write(f"error: {display_text(row_name(row))}: {row['error']}", file=sys.stderr)
    return rows


def row_name(row):
    """What an error line names: a file's path, a sample's key."""
    return row["path"] if "path" in row else row["key"]


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
            tqdm.write(f"error: {display_text(row_name(meta))}: {meta['error']}", file=sys.stderr)
        rows.append(row)
    return rows, scored, failed


def main(argv=None):
    try:
        return classify(parse_args(argv))
    finally:  # a gloo group left to the interpreter's exit can abort the process (SIGABRT) after its work is done
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def classify(args):
    from citytools.scorer import Scorer

    for path in args.paths:
        if path.startswith("@") and not os.path.isfile(path[1:]):
            raise UsageError(f"{path[1:]}: list file not found")
        if not path.startswith("@") and not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or folder")
    check_destination(args)
    rank, world = distributed()
    route = DatasetRoute(args) if args.dataset else FolderRoute(args)  # a dataset that cannot be read: said first
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
    store = route.store
    refused = transfers = None
    if rank == 0:
        try:
            store.lock()  # a second process on this output stops here, before it writes anything
            store.start(route.setup(scorer), fresh=args.no_resume)
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
        rank, failed = score_files(args, scorer, route)
        if rank == 0 and args.label:
            failed += apply_filters(args, scorer.columns(), store, transfers)
        if rank == 0 and args.push_to_hub:
            from citytools.hub_scores import push_scores

            push_scores(args.out, args.push_to_hub, route.metadata(scorer), private=args.private)
    finally:
        if transfers is not None:
            transfers.close()
        store.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK
