"""The scoring engine every tool shares: robust image decoding, file discovery, and batched
multi-model inference with one backbone pass per tile for models that share backbone weights."""

import contextlib
import hashlib
import io
import json
import os
import queue
import re
import signal
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

try:  # libspng decodes 8-bit PNGs about twice as fast as Pillow; without it Pillow decodes them all
    import pyspng
except ImportError:
    pyspng = None

from remote_code import (
    CPU_CHUNK_BYTES,
    CityClassifierForImageClassification,
    CityClassifierImageProcessor,
    to_device,
)
from toolkit import MAX_PIXELS, first_line, weights_fingerprint

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif", ".jxl"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a half-grey image


class BadImage(Exception):
    """An input that cannot be scored; its message is the one-line reason in the error column."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # 8-bit colour types libspng hands back as Pillow reads them (not LA)


def decode_png(path):
    """A PNG file -> a PIL image with the pixels and mode Pillow decodes, through libspng (faster than
    Pillow: docs/speed.md), or None where Pillow must decode it:
    - no pyspng; not 8-bit L, RGB or RGBA; interlaced; transparency by tRNS; animation;
    - a chunk other than pixel data whose CRC fails (Pillow rejects those; pyspng ignores CRCs);
    - no IEND (truncated); a file far larger than its pixels (huge metadata); anything libspng refuses.
    Pillow then decodes the file and words its errors, as before. EXIF (eXIf) is kept in `info`."""
    if pyspng is None or not isinstance(path, (str, os.PathLike)):
        return None
    with open(path, "rb") as f:
        data = f.read(len(PNG_SIGNATURE) + 25)  # the signature and IHDR
        if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        if os.fstat(f.fileno()).st_size > 2 * height * (4 * width + 1) + (16 << 20):
            return None  # far larger than its pixels (huge metadata): Pillow, which streams it, decides
        data += f.read()
    pos, header, exif = len(PNG_SIGNATURE), None, None
    while True:
        if pos + 12 > len(data):
            return None  # truncated before IEND
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length or pos + 12 + length > len(data):
            return None
        if kind != b"IDAT" and zlib.crc32(data[pos + 4 : pos + 8 + length]) != struct.unpack(
                ">I", data[pos + 8 + length : pos + 12 + length])[0]:
            return None
        if kind == b"IHDR":
            header = body
        elif kind in (b"tRNS", b"acTL"):
            return None
        elif kind == b"eXIf":
            exif = body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) != 13 or header[8] != 8 or header[9] not in PNG_MODES or header[12] != 0:
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # noqa: BLE001 - Pillow decodes it again and says what is wrong
        return None
    channels = len(PNG_MODES[header[9]])
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width) or \
            (pixels.shape[2] if pixels.ndim == 3 else 1) != channels:
        return None
    image = Image.fromarray(pixels if channels > 1 else pixels.reshape(height, width))  # L, RGB or RGBA
    if image.mode != PNG_MODES[header[9]]:
        return None
    if exif is not None:
        image.info["exif"] = exif
    return image


def load_image(path, max_pixels=MAX_PIXELS, draft_short=None, work_pixels=None):
    """Opens one file as the pipeline does (EXIF rotation applied, first frame of animations),
    keeping its mode for the processor. Raises BadImage with a one-line reason.

    Refused before decoding: more than `max_pixels` in the file, or in the largest image that
    scoring it would make (`work_pixels(width, height)`: a 10000x3 strip is resized to 1120000x336).

    draft_short(width, height) -> short side the scoring needs, or None: JPEGs are then decoded at
    a reduced scale (libjpeg's DCT scaling) that keeps at least that short side. Not exact."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow still raises above 2x
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise BadImage(f"decompression bomb: {image.width}x{image.height} pixels exceeds {max_pixels} "
                                   "(see --max-pixels)")
                work = work_pixels(*image.size) if work_pixels else 0
                if work > max_pixels:
                    raise BadImage(f"too large to process: scoring {image.width}x{image.height} would make an image "
                                   f"of {work} pixels, over the {max_pixels} limit (see --max-pixels)")
                image.seek(0)
                size = image.size
                need = draft_short(*image.size) if draft_short and image.format == "JPEG" else None
                if need:
                    scale = need / min(image.size)
                    image.draft("RGB", (int(image.width * scale + 0.999), int(image.height * scale + 0.999)))
                decoded = decode_png(path) if image.format == "PNG" else None
                orientation = (image if decoded is None else decoded).getexif().get(0x0112, 1)
                if decoded is None:
                    image.load()
                    result = ImageOps.exif_transpose(image)  # a new image, detached from the file, rotated or not
                else:  # already detached: a copy only to rotate it
                    result = decoded if orientation == 1 else ImageOps.exif_transpose(decoded)
                if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
                    size = size[::-1]
                result.info["file_size"] = size  # the file's own size, also when decoded at a reduced scale
                return result
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"decompression bomb: {first_line(error)}") from None
    except FileNotFoundError:
        kind = "broken symlink" if os.path.islink(path) else "file not found"
        raise BadImage(kind) from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except IsADirectoryError:
        raise BadImage("is a directory") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as error:
        raise BadImage(f"cannot decode: {first_line(error)}") from None


def load_dataset_image(value, max_pixels=MAX_PIXELS, work_pixels=None):
    """A `datasets` Image(decode=False) value ({"bytes", "path"}) opened as `load_image` opens a
    file: the same EXIF rotation, limits and one-line BadImage reasons."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    return load_image(source, max_pixels, work_pixels=work_pixels)


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


class FileStream(torch.utils.data.IterableDataset):
    """Streams (meta, inputs) per file for this rank and worker, decoding in the worker process.

    Files reach the workers through a queue when `feed` was called (`loader_batches` does, for two
    workers or more): one walk in the main process, and each worker takes the next file when it is
    free. Otherwise every worker walks and keeps a fixed share by path key, and the run waits for the
    worker that drew the most work (the queue's gain: bench/gpu-h100-run4.json).

    Each worker notes the file it is decoding in `markers` (see WorkerMarkers), so that when the
    kernel kills a worker (out of memory) the main process can give that file an error row."""

    def __init__(self, paths, scorer, done, rank, world, max_pixels, fast_decode=False, exclude=(), markers=None,
                 tiling=None):
        self.paths, self.scorer, self.done = paths, scorer, done
        self.rank, self.world, self.max_pixels, self.fast_decode = rank, world, max_pixels, fast_decode
        self.exclude, self.markers, self.tiling = exclude, markers, tiling
        self.queue = self.feeder = None

    def pending(self):
        """This rank's files not done yet, each once (a file named twice in one run is scored once)."""
        seen = set()
        for path in iter_files(self.paths, self.exclude):
            key = path_key(path)
            if key % self.world != self.rank or key in seen or is_done(self.done, key):
                continue
            seen.add(key)
            yield path

    def feed(self, workers):
        """Makes the workers take their files from a queue that a thread of this process fills, walking
        once. -> (start, stop, error): start the thread once the workers exist (`iter(loader)`: no
        thread is running when they fork), stop it (a run cut short), and error() the exception that
        ended the walk early, or None: the caller raises it, so no file is left out unannounced."""
        import multiprocessing

        self.queue, self.feeder = multiprocessing.Queue(maxsize=64 * workers), os.getpid()
        # paths left in it when its workers are gone (one died: the loader restarts with a new queue)
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
                for path in self.pending():
                    if not put(path):
                        return
            except BaseException as error:  # noqa: BLE001 - handed to the main thread by error()
                failure.append(error)
            finally:
                for _ in range(workers):  # one end mark a worker
                    put(None)

        thread = threading.Thread(target=walk, name="file-feeder", daemon=True)
        return thread.start, stop.set, lambda: failure[0] if failure else None

    def paths_to_load(self, info):
        if info is None:  # in this process: all of this rank's files
            yield from self.pending()
        elif self.queue is not None:
            while True:
                try:
                    path = self.queue.get(timeout=1.0)
                except queue.Empty:
                    if os.getppid() != self.feeder:  # the main process is gone: so is the feeder
                        return
                    continue
                if path is None:
                    return
                yield path
        else:  # a fixed share by path key: a path named twice goes to the same worker
            for path in self.pending():
                if path_key(path) // self.world % info.num_workers == info.id:
                    yield path

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        marker = self.markers.open() if self.markers is not None and info else None
        for path in self.paths_to_load(info):
            if marker:
                marker.set(path)
            meta, inputs = self.load(path)
            if marker:
                marker.clear()
            yield meta, inputs

    def load(self, path):
        meta = {"path": path, "width": None, "height": None, "error": None, **file_stamp(path)}
        try:
            fault_injection(path)
            draft = self.scorer.draft_short if self.fast_decode else None
            image = load_image(path, self.max_pixels or MAX_PIXELS, draft,
                               lambda width, height: self.scorer.work_pixels(width, height, self.tiling))
            meta["width"], meta["height"] = image.info["file_size"]
            return meta, self.scorer.preprocess(image, tiling=self.tiling)
        except BadImage as error:
            meta["error"] = str(error)
        except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
            meta["error"] = f"cannot process: {first_line(error)}"
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
    list of whole images for "device" cropping; tile_mask (batch, slots)) for the decodable images, or
    None). Padding never leaves the worker: it is half the tiles."""
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
        if isinstance(tiles[0], DeviceImage):  # whole images of any size: one tensor each
            grouped.append(([torch.from_numpy(image.pixels) for image in tiles], mask))
        else:
            grouped.append((torch.from_numpy(np.concatenate(tiles)), mask))
    return metas, grouped


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
        joined.append((tiles, torch.cat([torch.nn.functional.pad(mask, (0, slots - mask.shape[1])) for mask in masks])))
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
    feeding = workers > 1 and isinstance(dataset, FileStream)  # one worker has no one to share with
    in_order = not feeding if in_order is None else in_order
    start, stop, failure = dataset.feed(workers) if feeding else (None, None, None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch(batch_size, workers, device, greedy),
                                         num_workers=workers, collate_fn=collate, pin_memory=on_gpu,
                                         prefetch_factor=4 if workers else None, in_order=in_order)
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


@dataclass
class ScoringModel:
    key: str
    model: CityClassifierForImageClassification
    processor: CityClassifierImageProcessor
    tiling: bool  # this run's options, passed per call: the loaded config and processor stay as saved
    combine: str
    weights: str  # fingerprint of the checkpoint files


def pick_device(device="auto"):
    """A torch.device for --device; a ValueError naming the problem when it does not exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif chosen.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return chosen


def pick_dtype(dtype, device):
    """auto: float16 on CUDA, float32 on a CPU. Whatever the dtype, the model keeps its stem and head
    in float32 and takes float32 pixels (see CityClassifierForImageClassification), so bf16 and fp16
    change scores by less than 1e-2 (tests/test_precision.py); on a CPU bf16 speeds up only the CLIP
    tower, which for the shipped model is a small share of the work (docs: README, "Precision")."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). CITYCLASSIFIER_CPU_BF16=1 or 0
    forces the answer, so that both branches of every choice made on it run on any machine."""
    forced = os.environ.get("CITYCLASSIFIER_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open(cpuinfo) as f:
            flags = f.read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_workers(device, cores=None):
    """Decoding processes: feeding a GPU, every core but the one that drives it (the data path must
    keep up with the GPU); on a CPU half the cores, the model's threads get the other half (see
    `model_threads`): with the shipped model an image costs about as much to decode and cut as to
    score (bench/bench_classify.py --profile). `cores` defaults to this machine's."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - 1) if device.type == "cuda" else cores // 2


def model_threads(num_parameters, workers, cores=None):
    """CPU threads for the model beside `workers` decoding processes: the cores they leave free, at
    least 1 (oversubscribed cores cost more than they give); big models are compute-bound and want
    every core. `cores` defaults to this machine's."""
    cores = cores or os.cpu_count() or 1
    return cores if num_parameters > 50_000_000 else max(1, cores - workers)


def default_batch_size(device, model):
    """Images per batch: 8 on a CPU; on a GPU as many as fit, by an estimate of one view's inference
    activations, in half the free memory (5 views an image), between 8 and 64."""
    if device.type != "cuda":
        return 8
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    view_bytes = 2 * tokens * (vision.intermediate_size + 4 * vision.hidden_size) * 2  # fp16, two live layers
    if model.stem is not None:
        side = model.config.pixel_size
        view_bytes += 2 * model.config.stem["channels"][0] * side * side * 2
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(64, max(8, free // 2 // (5 * view_bytes))))


@dataclass
class DeviceImage:
    """A decoded RGB image (H, W, 3) uint8 whose `views` crops the model's device cuts itself
    (`CityClassifierImageProcessor.device_views`, the same bytes as the CPU's crops)."""

    pixels: np.ndarray
    views: int

    def __len__(self):
        return self.views


def view_tiles(processor, image, tiling, mode):
    """The real tiles of one image, for `collate`, in one of three forms by where the model runs:
    "normalised": (k, 3, S, S) float32, normalised here in the decoding worker, for a CPU (where the
    model's process is the slower side: docs/speed.md); "uint8": (k, S, S, 3) crops, a quarter of
    the bytes, normalised by the GPU; "device": the whole decoded image (`DeviceImage`), resized,
    cut and normalised by the GPU, so that the decoding workers only decode."""
    if mode == "device":
        image = processor.prepare(image, tiling)  # RGB; non-RGB modes already resized, as the original
        pixels = np.asarray(image)  # read-only from Pillow: torch wants to be able to write
        tiled = processor.is_tiled(*image.size, tiling)  # the same answer as before `prepare`'s resize
        return DeviceImage(pixels if pixels.flags.writeable else pixels.copy(),
                           processor.tile_slots(True) if tiled else 1)
    crops = [processor.resize_and_crop(view) for view in processor.views(image, tiling=tiling)]
    return np.stack(crops) if mode == "uint8" else processor.normalize_views(crops)


def crop_mode(device, processors, requested="auto"):
    """Where views are cut: by the decoding workers ("normalised" crops for a CPU, "uint8" for a GPU)
    unless `requested` is "device": the model's device resizes and cuts them from the whole decoded
    image, the same bytes (BILINEAR/BICUBIC processors only; on a CPU too, for tests). Not the GPU
    default: its workers feed more crops, but classify.py as a whole was slower with it on an H100
    (bench/gpu-h100-run3.json, docs/speed.md)."""
    if requested not in ("auto", "workers", "device"):
        raise ValueError(f"crop mode must be auto, workers or device, got {requested!r}")
    if requested == "device":
        if not all(processor.device_views_supported() for processor in processors):
            raise ValueError("cropping on the device needs BILINEAR or BICUBIC resampling, crop <= size and the "
                             "five-crop tiling (not --tiling-mode grid)")
        return "device"
    return "uint8" if device.type == "cuda" else "normalised"


def device_crops(processor, images, tile_mask, device):
    """Whole images from `collate` ("device" mode) -> their views' uint8 crops (n, S, S, 3), cut on
    `device`; `tile_mask` (on the CPU: reading it must not wait for the GPU) says how many views each
    has (5: tiled), as the decoding worker decided."""
    counts = tile_mask.sum(1).tolist()
    return torch.cat([processor.device_views(to_device(image, device), tiling=count > 1)
                      for image, count in zip(images, counts)])


def to_host(tensor):
    """`tensor` in host memory; from a GPU into pinned memory without waiting (read it after
    `ready_event`'s event, or torch.cuda.synchronize). The other way: `to_device`."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def ready_event(device):
    """A CUDA event recorded behind everything queued so far on `device` (its `synchronize()` waits
    for that work, `to_host` copies included), or None on a CPU, where nothing is left to wait for."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def model_pixels(processor, tiles, tile_mask, device):
    """Tiles from `collate` (a tensor of crops, or a list of whole images with `tile_mask` counting
    their views) -> normalised (n, 3, S, S) float32 pixels on `device`. Never rounded to the model's
    dtype here: the model casts what may be cast (its CLIP tower's input), while the fringe
    measurements and the stem need the exact pixels (bf16 cannot hold one grey level's step)."""
    if isinstance(tiles, list):
        tiles = device_crops(processor, tiles, tile_mask, device)
    tiles = to_device(tiles, device)
    if tiles.dtype == torch.uint8:
        tiles = processor.normalize_tensor(tiles)
    return tiles.float()


def model_key(name):
    """A short column prefix: the folder name ("default" for the shipped model), or the Hub repo name."""
    folder = Path(name).resolve()
    if folder.is_dir():
        return "default" if folder == Path(__file__).resolve().parent else folder.name
    return name.rstrip("/").split("/")[-1]


def check_model_name(name):
    """A local folder, or something shaped like a Hub id; a path that does not exist is an error at
    once (instead of a minute of Hub retries for `models/ca` typed wrong)."""
    if os.path.isdir(name):
        return
    path = Path(name)
    looks_local = name.startswith(("/", ".", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1 \
        or path.exists() or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    if looks_local:
        what = "is not a folder" if path.exists() else "no such model folder"
        raise ValueError(f"{name}: {what} (a model is a folder with config.json and model.safetensors, or a Hub id)")


def load_scoring_model(name, dtype):
    """(model, processor) from a folder or Hub id: safetensors only, every weight present, or a
    ValueError with one line naming the model and the problem."""
    check_model_name(name)
    try:
        model = CityClassifierForImageClassification.from_pretrained(name, dtype=dtype, use_safetensors=True)
        processor = CityClassifierImageProcessor.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - any loading failure is one line naming the model
        text = first_line(error)
        if "safetensors" in text.lower() or "model.safetensors" in str(error):
            text = "no model.safetensors (pickled checkpoints are never loaded: convert them with save_pretrained)"
        raise ValueError(f"{name}: cannot load a CityClassifier model ({text})") from None
    return model, processor


def backbone_fingerprint(model):
    digest = hashlib.sha256()
    digest.update(json.dumps(getattr(model.config, "fringe_features", None), sort_keys=True).encode())
    state = {f"{i}.{name}": tensor for i, module in enumerate(model.backbone_modules())
             for name, tensor in module.state_dict().items()}
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Scorer:
    """Scores images with one or more CityClassifier models.

    Models whose backbone weights and preprocessing are identical form a group that runs the
    backbone once per tile; each model's head then reads the shared embeddings. `tiling`,
    `tiling_mode` and `combine` override what each model's processor and config say, for this
    scorer only.
    """

    def __init__(self, names, device="auto", dtype="auto", tiling=None, combine=None, crop="auto", tiling_mode=None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.models, self.groups = [], []
        groups = {}
        for name in names:
            model, processor = load_scoring_model(name, self.dtype)
            processor = processor.with_options(tiling_mode=tiling_mode)
            model.to(self.device).eval()
            key = model_key(name)
            if any(m.key == key for m in self.models):
                key = f"{key}-{len(self.models)}"
            scoring = ScoringModel(key, model, processor, processor.tiling if tiling is None else tiling,
                                   combine or model.config.tile_combine, weights_fingerprint(name))
            self.models.append(scoring)
            signature = (backbone_fingerprint(model), repr(sorted(processor.to_dict().items())), scoring.tiling)
            if signature not in groups:
                groups[signature] = len(self.groups)
                self.groups.append([])
            self.groups[groups[signature]].append(scoring)
        self.crop_mode = crop_mode(self.device, self.processors, crop)

    @property
    def processors(self):
        """One processor per group: what the decoding workers must produce."""
        return [group[0].processor for group in self.groups]

    def setup(self):
        """What decides the scores, for resume: each model's columns, weights, processing and options."""
        models = []
        for m in self.models:
            processing = {k: v for k, v in m.processor.to_dict().items() if k != "tiling"}
            models.append({"key": m.key, "labels": list(m.model.config.id2label.values()), "weights": m.weights,
                           "processor": hashlib.sha256(json.dumps(processing, sort_keys=True, default=str).encode())
                           .hexdigest()[:16], "tiling": m.tiling, "combine": m.combine})
        return {"models": models}

    def columns(self):
        """Score columns in output order: `<model>:<label>` for each label, then `<model>:top_label`."""
        names = []
        for m in self.models:
            names += [f"{m.key}:{label}" for label in m.model.config.id2label.values()] + [f"{m.key}:top_label"]
        return names

    def preprocess(self, image, tiling=None):
        """PIL image -> per group (real tiles from `view_tiles`, tile slots) for `collate`. `tiling`
        overrides the scorer's for this call."""
        out = []
        for group in self.groups:
            processor, on = group[0].processor, group[0].tiling if tiling is None else tiling
            tiles = view_tiles(processor, image, on, self.crop_mode)
            out.append((tiles, max(processor.tile_slots(on), len(tiles))))  # grid tiling: may be more than 5
        return out

    def work_pixels(self, width, height, tiling=None):
        """Pixels of the largest image that preprocessing an image of this size makes."""
        return max(group[0].processor.work_pixels(width, height, group[0].tiling if tiling is None else tiling)
                   for group in self.groups)

    def draft_short(self, width, height):
        """The smallest short side an image of this size can be decoded at without changing what any
        processor does with it, or None when it needs full resolution (tiles are cut at full size)."""
        needs = []
        for group in self.groups:
            processor = group[0].processor
            crop, limit = processor.size["shortest_edge"], processor.tile_resize_limit
            if processor.is_tiled(width, height, tiling=group[0].tiling):
                if max(width, height) <= limit or processor.tiling_mode == "grid":
                    return None
                needs.append(limit)  # resized to this short side before tiling
            else:
                needs.append(crop)
        need = max(needs)
        return need if min(width, height) >= 2 * need else None  # JPEG scales by 1/2, 1/4, 1/8 only

    @torch.inference_mode()
    def outputs(self, grouped_inputs, combine=None):
        """Yields (ScoringModel, CityClassifierOutput, tile_mask) for every model: the backbone runs
        once per group on the real tiles, each head reads the shared embeddings.

        grouped_inputs: per group (the real tiles, tile_mask (batch, tiles)), from `collate`."""
        for group, (pixels, host_mask) in zip(self.groups, grouped_inputs):
            if isinstance(pixels, list):  # whole images: the device cuts their views
                pixels = device_crops(group[0].processor, pixels, host_mask, self.device)
            tile_mask = to_device(host_mask, self.device)
            chunks = (model_pixels(group[0].processor, chunk, None, self.device)
                      for chunk in pixels.split(self.chunk_views(pixels)))
            image_embeds = group[0].model.embed_tiles(chunks, host_mask)  # the mask on the host: no wait
            for m in group:
                yield m, m.model(image_embeds=image_embeds, tile_mask=tile_mask,
                                 tile_combine=combine or m.combine), tile_mask

    def chunk_views(self, pixels):
        """Views per backbone call: all, except for uint8 crops on a CPU, normalised as many at a time
        as keep each intermediate under 16 MB (glibc hands larger blocks out as fresh pages from the
        kernel, every time: see CityClassifierForImageClassification._stem_features)."""
        if self.device.type != "cpu" or pixels.dtype != torch.uint8:
            return len(pixels)
        return max(1, CPU_CHUNK_BYTES // (pixels[0].numel() * 8))  # the float64 rescale is the widest step

    def score(self, grouped_inputs):
        """One dict of score columns per image (see `columns`)."""
        return self.submit(grouped_inputs)()

    def submit(self, grouped_inputs):
        """Starts scoring a batch -> `Submitted`: called, it waits for the scores and returns `score`'s
        rows. On a GPU nothing here waits for the GPU: its work is queued, the scores are
        copied to pinned memory behind it, and the caller prepares (and queues) the next batch while
        the GPU works, instead of the GPU idling while the host writes results and cuts views."""
        with torch.inference_mode():
            scores = [(m, to_host(output.scores.float())) for m, output, _ in self.outputs(grouped_inputs)]
        return Submitted(scores, ready_event(self.device))

    def warm_up(self, images=4):
        """Scores `images` blank tiled images and waits for them -> their rows. On a GPU, a fresh
        process's first model call initialises cuBLAS and loads each kernel it runs (CUDA loads them
        lazily); called while the decoding workers are on their first files (`loader_batches`'
        `on_start`), that set-up is meant to overlap their decoding instead of delaying the first real
        batch (what it saves: bench_gpu.py's first_calls). For a GPU only:
        a CPU's first call costs little, and its blank batch would cost a batch's time."""
        return self.score(collate([({}, self.preprocess(blank_image(self.processors)))] * images)[1])

    @staticmethod
    def rows(scores, ready=None):
        """[(ScoringModel, (batch, labels) scores on the host)] -> one dict of score columns per image,
        after the `ready` event (the copies to the host are done)."""
        if ready is not None:
            ready.synchronize()
        rows = None
        for m, host in scores:
            table = host.numpy()
            if rows is None:
                rows = [{} for _ in table]
            labels = list(m.model.config.id2label.values())
            for row, values in zip(rows, table):
                for label, value in zip(labels, values):
                    row[f"{m.key}:{label}"] = float(value)
                row[f"{m.key}:top_label"] = labels[int(np.argmax(values))] if len(labels) > 1 else None
        return rows or []


class Submitted:
    """A batch's scores on their way (`Scorer.submit`): called, it waits for them and returns
    `Scorer.score`'s rows; `done()` says without waiting whether they have arrived."""

    def __init__(self, scores, ready):
        self.scores, self.ready = scores, ready

    def done(self):
        return self.ready is None or self.ready.query()

    def __call__(self):
        return Scorer.rows(self.scores, self.ready)
