"""Feeding the model: files decoded and cut in worker processes, handed over in batches as they
finish, with a note of the file each worker is on (so a killed worker costs one error row), and a
stopwatch that says where the seconds went."""

import contextlib
import os
import queue
import re
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from citytools.discovery import iter_files, path_key
from citytools.images import MAX_PIXELS, error_text, load_image
from citytools.results import file_row
from citytools.toolkit import first_line
from citytools.views import DeviceImage


class QueueFedStream(torch.utils.data.IterableDataset):
    """Streams (meta, inputs) per item (a file, a dataset sample) for this rank and worker, decoding in
    the worker process; a subclass says what the items are (`pending`), how one is loaded (`load`), and
    which worker takes an item when there is no queue (`takes`).

    Items reach the workers through a queue when `feed` was called (`loader_batches` does, for two
    workers or more): one walk in the main process, and each worker takes the next item when it is
    free. Otherwise every worker walks and keeps a fixed share, and the run waits for the worker that
    drew the most work (the queue's gain: bench/gpu-h100-run4.json).

    Each worker notes the item it is decoding in `markers` (see WorkerMarkers, `marker_text`), so that
    when the kernel kills a worker (out of memory) the main process can give that item an error row."""

    QUEUE_PER_WORKER = 64  # items waiting in the queue per worker (samples carry their bytes: fewer)

    def __init__(self, markers=None):
        self.markers = markers
        self.queue = self.feeder = None

    def pending(self):
        """This rank's items not done yet, each once."""
        raise NotImplementedError

    def load(self, item):
        """-> (meta, `Scorer.preprocess` output, or None with meta["error"] saying why)."""
        raise NotImplementedError

    def takes(self, item, info):
        """Whether worker `info` (torch's worker info) takes `item` when every worker walks."""
        raise NotImplementedError

    def marker_text(self, item):
        """What a worker's marker holds while it is on `item` (`WorkerMarkers.culprits` gives it back)."""
        return item

    def feed(self, workers):
        """Makes the workers take their items from a queue that a thread of this process fills, walking
        once. -> (start, stop, error): start the thread once the workers exist (`iter(loader)`: no
        thread is running when they fork), stop it (a run cut short), and error() the exception that
        ended the walk early, or None: the caller raises it, so no item is left out unannounced."""
        import multiprocessing

        self.queue, self.feeder = multiprocessing.Queue(maxsize=self.QUEUE_PER_WORKER * workers), os.getpid()
        # items left in it when its workers are gone (one died: the loader restarts with a new queue)
        # must not keep this process from exiting; the restarted walk hands them out again
        self.queue.cancel_join_thread()
        stop, failure = threading.Event(), []

        def put(item):
            while not stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def walk():
            try:
                for item in self.pending():
                    if not put(item):
                        return
            except BaseException as error:  # noqa: BLE001 - handed to the main thread by error()
                failure.append(error)
            finally:
                for _ in range(workers):  # one end mark a worker
                    put(None)

        thread = threading.Thread(target=walk, name="feeder", daemon=True)
        return thread.start, stop.set, lambda: failure[0] if failure else None

    def items_to_load(self, info):
        if info is None:  # in this process: all of this rank's items
            yield from self.pending()
        elif self.queue is not None:
            while True:
                try:
                    item = self.queue.get(timeout=1.0)
                except queue.Empty:
                    if os.getppid() != self.feeder:  # the main process is gone: so is the feeder
                        return
                    continue
                if item is None:
                    return
                yield item
        else:  # a fixed share (`takes`)
            for item in self.pending():
                if self.takes(item, info):
                    yield item

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        marker = self.markers.open() if self.markers is not None and info else None
        for item in self.items_to_load(info):
            if marker:
                marker.set(self.marker_text(item))
            meta, inputs = self.load(item)
            if marker:
                marker.clear()
            yield meta, inputs


class FileStream(QueueFedStream):
    """The folder route's files (paths, folders, @lists), each decoded by `load_image`. With no queue,
    a worker keeps a fixed share by path key (a path named twice goes to the same worker)."""

    def __init__(self, paths, scorer, done, rank, world, max_pixels, fast_decode=False, exclude=(), markers=None,
                 tiling=None):
        super().__init__(markers)
        self.paths, self.scorer, self.done = paths, scorer, done
        self.rank, self.world, self.max_pixels, self.fast_decode = rank, world, max_pixels, fast_decode
        self.exclude, self.tiling = exclude, tiling

    def pending(self):
        """This rank's files not done yet, each once (a file named twice in one run is scored once)."""
        seen = set()
        for path in iter_files(self.paths, self.exclude):
            key = path_key(path)
            if key % self.world != self.rank or key in seen or is_done(self.done, key):
                continue
            seen.add(key)
            yield path

    def takes(self, path, info):
        return path_key(path) // self.world % info.num_workers == info.id

    def load(self, path):
        meta = file_row(path, **file_stamp(path))
        try:
            fault_injection(path)
            draft = self.scorer.draft_short if self.fast_decode else None
            image = load_image(path, self.max_pixels or MAX_PIXELS, draft,
                               lambda width, height: self.scorer.work_pixels(width, height, self.tiling))
            meta["width"], meta["height"] = image.info["picture_size"]
            return meta, self.scorer.preprocess(image, tiling=self.tiling)
        except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
            meta["error"] = error_text(error)
        return meta, None


def file_stamp(path):
    """{"file_size", "modified"} (bytes, st_mtime_ns) of a file as it is before it is decoded, or
    Nones: the scores are of this version of it (--copy-to/--move-to refuse a file changed since)."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):  # load_image words the error
        return {"file_size": None, "modified": None}
    return {"file_size": stat.st_size, "modified": stat.st_mtime_ns}


def fault_injection(path):
    """Test hook: CITYCLASSIFIER_KILL_WORKER_ON=NAME makes the decoding process SIGKILL itself on a
    file of that name, as the kernel's out-of-memory killer would (tests/test_reliability.py)."""
    name = os.environ.get("CITYCLASSIFIER_KILL_WORKER_ON")
    if name and os.path.basename(path) == name and torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)


def hold_for_kill(rows_written):
    """Test hook: CITYCLASSIFIER_HOLD_AFTER_ROWS=N:PATH makes classify.py's main process, once it has
    written N rows, create PATH and wait there, its decoding workers alive, so that a test kills it at
    a known point instead of racing it (tests/test_classify.py)."""
    spec = os.environ.get("CITYCLASSIFIER_HOLD_AFTER_ROWS")
    if spec and rows_written >= int(spec.split(":", 1)[0]):
        Path(spec.split(":", 1)[1]).write_text(str(os.getpid()))
        while True:
            time.sleep(3600)


class WorkerMarkers:
    """A folder where each decoding worker keeps the path it is working on, one file per pid."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def open(self):
        return WorkerMarker(self.folder / str(os.getpid()))

    def culprits(self, error):
        """{path: reason} for the files that dead workers were decoding when `error` (the DataLoader's
        'worker exited / killed' RuntimeError) was raised."""
        match = re.search(r"pid(?:\(s\))?\s+([\d,\s]+)", str(error))
        pids = {int(p) for p in re.findall(r"\d+", match.group(1))} if match else set()
        out = {}
        for marker in self.folder.iterdir():
            if not marker.name.isdigit() or (pids and int(marker.name) not in pids) or \
                    (not pids and process_alive(int(marker.name))):
                continue
            path = WorkerMarker.read(marker)
            if path:
                out[path] = f"the decoding process died on this file ({first_line(error)}; out of memory?)"
            marker.unlink()
        return out


class WorkerMarker:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def set(self, path):
        data = os.fsencode(path)
        os.pwrite(self.fd, struct.pack("<I", len(data)) + data, 0)

    def clear(self):
        os.pwrite(self.fd, struct.pack("<I", 0), 0)

    @staticmethod
    def read(marker):
        data = marker.read_bytes()
        if len(data) < 4:
            return None
        size = struct.unpack("<I", data[:4])[0]
        return os.fsdecode(data[4 : 4 + size]) if size and len(data) >= 4 + size else None


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def collate(items):
    """-> (metas, per group (the real tiles only, as `Scorer.preprocess` made them: one tensor, or a
    list of whole images for "device" cropping; tile_mask (batch, slots); the pictures' native inputs by
    name, stacked: `fringe_values` (batch, F) float32, `fringe_patches`, or none) for the decodable
    images, or None). Padding never leaves the worker: it is half the tiles."""
    metas = [meta for meta, _ in items]
    good = [inputs for _, inputs in items if inputs is not None]
    if not good:
        return metas, None
    grouped = []
    for g in range(len(good[0])):
        tiles = [inputs[g][0] for inputs in good]
        mask = torch.zeros(len(tiles), max(inputs[g][1] for inputs in good), dtype=torch.long)
        for row, views in zip(mask, tiles):
            row[: len(views)] = 1
        native = {name: torch.from_numpy(np.stack([inputs[g][2][name] for inputs in good])) for name in good[0][g][2]}
        if isinstance(tiles[0], DeviceImage):  # whole images of any size: one tensor each
            grouped.append(([torch.from_numpy(image.pixels) for image in tiles], mask, native))
        else:
            grouped.append((torch.from_numpy(np.concatenate(tiles)), mask, native))
    return metas, grouped


def preprocess_each(values, prepare):
    """`prepare(value) -> inputs` (`Scorer.preprocess` of an image, a path, a dataset cell) for each of
    `values`, in the main process -> (positions that worked, their inputs collated (see `collate`) or
    None, {position: one-line error}): a bad value is an error, never a crash."""
    items, good, errors = [], [], {}
    for i, value in enumerate(values):
        try:
            items.append((None, prepare(value)))
            good.append(i)
        except Exception as error:  # noqa: BLE001 - an error row, never a crash
            errors[i] = error_text(error)
    return good, (collate(items)[1] if items else None), errors


def micro_batch(batch_size, workers, device, split=False):
    """Images per decoding worker's batch. A worker fills each batch alone, so with whole batches
    the first came only after every worker had decoded `batch_size` images, and a collection of a
    few batches per worker arrived all at once at the end, the GPU idle while they decoded and they
    idle while it ran (bench/gpu-h100-run3.json). On a GPU (or with `split`) they hand out small batches
    (batch / workers, at least 2) and `join_batches` joins them in the main process. With `split`
    (an idle device takes a quarter of a batch: `loader_batches`' `idle`), at most an eighth of a
    batch: with few workers, each would otherwise hand over more than that quarter at once (2
    workers, 32 images each), and the device would wait for them as for a whole batch."""
    if (device.type != "cuda" and not split) or workers <= 1:
        return batch_size
    size = -(-batch_size // workers)
    if split:
        size = min(size, first_batch(batch_size) // 2)
    return max(2, size)


def join_batches(parts, device):
    """(metas, grouped) batches from `collate` -> one: metas chained; per group, whole-image lists
    chained, crop tensors copied to `device` as they are (pinned: no wait) and joined there."""
    if len(parts) == 1:
        return parts[0]
    # the same walk as `collate`'s, one level up (collated parts, not items): alike on purpose
    metas = [meta for part_metas, _ in parts for meta in part_metas]
    good = [grouped for _, grouped in parts if grouped is not None]
    if not good:
        return metas, None
    joined = []
    for g in range(len(good[0])):
        tiles = [grouped[g][0] for grouped in good]
        if isinstance(tiles[0], list):
            tiles = [image for images in tiles for image in images]
        else:
            tiles = torch.cat([t.to(device, non_blocking=True) for t in tiles])
        masks = [grouped[g][1] for grouped in good]
        slots = max(mask.shape[1] for mask in masks)  # grid tiling: parts may have different slot counts
        native = {name: torch.cat([grouped[g][2][name] for grouped in good]) for name in good[0][g][2]}
        joined.append((tiles, torch.cat([torch.nn.functional.pad(mask, (0, slots - mask.shape[1])) for mask in masks]),
                       native))
    return metas, joined


def loader_batches(dataset, batch_size, workers, device, in_order=None, idle=None, on_start=None):
    """Batches of at least `batch_size` images (fewer at the end) as `collate` makes them, from a
    dataset of (meta, `Scorer.preprocess` output) items (`FileStream`, or a map-style dataset),
    decoded by `workers` processes into pinned memory on a GPU (see `micro_batch`). A `FileStream`'s
    workers take files from one queue (`FileStream.feed`) and hand their batches over as they finish
    them (the metas name the files); a map-style dataset's come in index order unless `in_order` is
    False (its metas must then say which items they are).

    `idle` (for a GPU, whose work is queued; with 2 workers or more): a function saying, without
    waiting, whether the device has finished the work queued so far. While it has, a batch goes as
    soon as it holds a quarter of `batch_size` images (see `first_batch`): the device starts on the
    first images instead of waiting for a whole batch, and the last batch it runs alone, after the
    decoding ended, is small. `on_start()` is called once the workers are started, before the first
    batch is waited for (the model warms up meanwhile: `Scorer.warm_up`)."""
    on_gpu = device.type == "cuda"
    greedy = idle is not None and workers > 1
    smallest = first_batch(batch_size) if greedy else batch_size
    feeding = workers > 1 and isinstance(dataset, QueueFedStream)  # one worker has no one to share with
    in_order = not feeding if in_order is None else in_order
    start, stop, failure = dataset.feed(workers) if feeding else (None, None, None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch(batch_size, workers, device, greedy),
                                         num_workers=workers, collate_fn=collate, pin_memory=on_gpu,
                                         prefetch_factor=4 if workers else None, in_order=in_order,
                                         worker_init_fn=one_blas_thread if workers else None)
    try:
        batches = iter(loader)
        if feeding:
            start()
        if workers and threading.current_thread() is threading.main_thread():
            # The iterator installed torch's SIGCHLD handler, which raises a worker's death wherever the
            # main thread happens to be (seen inside a progress bar's exit, while handling a death that
            # had surfaced as a reset connection): the loader's own liveness check reports it instead,
            # at the next batch, where the tools catch it.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if on_start is not None:
            on_start()
        pending, count = [], 0
        for metas, grouped in batches:
            pending.append((metas, grouped))
            count += len(metas)
            if count >= batch_size or (count >= smallest and idle()):
                yield join_batches(pending, device)
                pending, count = [], 0
        if pending:
            yield join_batches(pending, device)
        if feeding and failure() is not None:
            raise failure()
    finally:
        if feeding:
            stop()
            dataset.queue = dataset.feeder = None  # a later loader over this stream walks or feeds anew


def one_blas_thread(_worker_id=None):
    """A decoding worker's numpy BLAS on one thread (DataLoader's worker_init_fn): torch already runs
    one thread there, but numpy's BLAS (the native fringe measurement's small matrix products) starts
    one per core, which then fight the model's threads and the other workers for the cores (docs/speed.md).
    The measurement limits itself too (`native_fringes.one_blas_thread`), but gives numpy its setting
    back after each picture; a worker never needs more than one, so it keeps one throughout (without
    this, classify.py waited longer for decoded pictures in a check on the 2-core EPYC)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a BLAS without threadpoolctl runs as it is
        return
    threadpool_limits(1, user_api="blas")


def blank_image(processors):
    """A grey RGB image that every one of `processors` tiles: for warming a model up."""
    side = 2 * max(processor.size["shortest_edge"] for processor in processors) + 1
    return Image.new("RGB", (side, side), (128, 128, 128))


def first_batch(batch_size):
    """The fewest images a batch for an idle GPU holds (`loader_batches`' `idle`): a quarter of a
    full batch, enough views to keep a GPU busy while the next are decoded; bench_gpu.py's
    raw_backbone_small_batch measures the backbone's rate at that size."""
    return max(1, batch_size // 4)


class Stopwatch:
    """Seconds a run spends in each of its phases, for the line that says where its time went:
    `with stopwatch("phase"):`, or `stopwatch.timed(iterable, first, then)` for the waits on an
    iterator (the wait for its first item apart from the others)."""

    # a scoring run's phases as `line` words them (the model warms up while the first batch is awaited)
    PHASES = {"first_batch": "first batch after {:.2f}s", "warm_up": "of it {:.2f}s warming the model up",
              "waiting_for_images": "{:.2f}s waiting for decoded images", "model": "{:.2f}s in the model",
              "writing": "{:.2f}s writing rows", "table": "{:.2f}s writing the table"}

    def __init__(self, clock=time.perf_counter):
        self.seconds, self.clock = {}, clock

    @contextlib.contextmanager
    def __call__(self, phase):
        begin = self.clock()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + self.clock() - begin

    def timed(self, iterable, first, then):
        iterator, phase = iter(iterable), first
        while True:
            with self(phase):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            phase = then
            yield item

    def line(self, templates=None):
        """The phases of `templates` (phase -> words with a {} for the seconds; default `PHASES`) that
        show as 0.01 s or more, in that order, joined by commas."""
        return ", ".join(words.format(self.seconds[phase]) for phase, words in (templates or self.PHASES).items()
                         if self.seconds.get(phase, 0.0) >= 0.005)


def is_done(done, key):
    i = np.searchsorted(done, key)
    return i < len(done) and done[i] == key
