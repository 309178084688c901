"""The scoring engine every tool shares: robust image decoding, file discovery, and batched
multi-model inference with one backbone pass per tile for models that share backbone weights."""

import hashlib
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from remote_code import CityClassifierForImageClassification, CityClassifierImageProcessor
from cityclassifier.modeling_cityclassifier import scatter_tiles  # noqa: E402 - the package exists once remote_code ran

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif", ".jxl"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS * 2  # Pillow raises DecompressionBombError above this; we say so per file
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a half-grey image


class BadImage(Exception):
    """An input that cannot be scored; its message is the one-line reason in the error column."""


def load_image(path, max_pixels=MAX_PIXELS, draft_short=None):
    """Opens one file as the pipeline does (EXIF rotation applied, first frame of animations),
    keeping its mode for the processor. Raises BadImage with a one-line reason.

    draft_short(width, height) -> short side the scoring needs, or None: JPEGs are then decoded at
    a reduced scale (libjpeg's DCT scaling) that keeps at least that short side. Not exact."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow still raises above 2x
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise BadImage(f"decompression bomb: {image.width}x{image.height} pixels exceeds {max_pixels}")
                image.seek(0)
                size = image.size
                need = draft_short(*image.size) if draft_short and image.format == "JPEG" else None
                if need:
                    scale = need / min(image.size)
                    image.draft("RGB", (int(image.width * scale + 0.999), int(image.height * scale + 0.999)))
                image.load()
                result = ImageOps.exif_transpose(image).copy()
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
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


def first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def iter_files(paths):
    """Yields files from PATH arguments, lazily: files as given, folders recursively (sorted, image
    extensions only), and `@list.txt` files holding one path per line."""
    for arg in paths:
        arg = str(arg)
        if arg.startswith("@"):
            with open(arg[1:], encoding="utf-8") as listing:
                for line in listing:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
        elif os.path.isdir(arg):
            yield from walk(arg)
        else:
            yield arg


def walk(folder):
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from walk(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            yield entry.path  # broken symlinks included: they get an error row


def root_of(path, paths):
    """The folder argument a discovered path came from (for --keep-structure), else its parent."""
    for arg in paths:
        arg = str(arg)
        if not arg.startswith("@") and os.path.isdir(arg):
            try:
                Path(path).relative_to(arg)
                return Path(arg)
            except ValueError:
                continue
    return Path(path).parent


def path_key(path):
    """64-bit key of a path: a million done files fit in 8 MB for resume."""
    return int.from_bytes(hashlib.blake2b(str(path).encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                          "little", signed=True)


class FileStream(torch.utils.data.IterableDataset):
    """Streams (meta, inputs) per file for this rank and worker, decoding in the worker process."""

    def __init__(self, paths, scorer, done, rank, world, max_pixels, fast_decode=False):
        self.paths, self.scorer, self.done = paths, scorer, done
        self.rank, self.world, self.max_pixels, self.fast_decode = rank, world, max_pixels, fast_decode

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shard, shards = self.rank * workers + worker, self.world * workers
        seen = set()  # the same file named twice in one run is scored once
        for path in iter_files(self.paths):
            key = path_key(path)  # sharding by key sends a path named twice to the same worker
            if key % shards != shard or key in seen or is_done(self.done, key):
                continue
            seen.add(key)
            meta = {"path": path, "width": None, "height": None, "error": None}
            try:
                draft = self.scorer.draft_short if self.fast_decode else None
                image = load_image(path, self.max_pixels or MAX_PIXELS, draft)
                meta["width"], meta["height"] = image.info["file_size"]
                inputs = self.scorer.preprocess(image)
            except BadImage as error:
                meta["error"] = str(error)
                inputs = None
            except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
                meta["error"] = f"cannot process: {first_line(error)}"
                inputs = None
            yield meta, inputs


def collate(items):
    """-> (metas, per group (pixels of the real tiles only (n, 3, S, S), tile_mask (batch, slots)) for
    the decodable images, or None). Padding never leaves the worker: it is half the tiles here."""
    metas = [meta for meta, _ in items]
    good = [inputs for _, inputs in items if inputs is not None]
    if not good:
        return metas, None
    grouped = []
    for g in range(len(good[0])):
        tiles = [inputs[g][0] for inputs in good]
        mask = torch.zeros(len(tiles), good[0][g][1], dtype=torch.long)
        for row, views in zip(mask, tiles):
            row[: len(views)] = 1
        grouped.append((torch.from_numpy(np.concatenate(tiles)), mask))
    return metas, grouped


def is_done(done, key):
    i = np.searchsorted(done, key)
    return i < len(done) and done[i] == key


@dataclass
class ScoringModel:
    key: str
    model: CityClassifierForImageClassification
    processor: CityClassifierImageProcessor


def pick_device(device="auto"):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype, device):
    """auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def model_key(name):
    """A short column prefix: the folder name ("default" for the shipped model), or the Hub repo name."""
    folder = Path(name).resolve()
    if folder.is_dir():
        return "default" if folder == Path(__file__).resolve().parent else folder.name
    return name.rstrip("/").split("/")[-1]


def backbone_fingerprint(model):
    digest = hashlib.sha256()
    state = {f"{i}.{name}": tensor for i, module in enumerate(model.backbone_modules())
             for name, tensor in module.state_dict().items()}
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Scorer:
    """Scores images with one or more CityClassifier models.

    Models whose backbone weights and preprocessing are identical form a group that runs the
    backbone once per tile; each model's head then reads the shared embeddings.
    """

    def __init__(self, names, device="auto", dtype="auto", tiling=None, combine=None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.models, self.groups = [], []
        groups = {}
        for name in names:
            try:
                model = CityClassifierForImageClassification.from_pretrained(name, dtype=self.dtype)
                processor = CityClassifierImageProcessor.from_pretrained(name)
            except (OSError, ValueError) as error:
                raise ValueError(f"{name}: cannot load a CityClassifier model ({first_line(error)})") from None
            if tiling is not None:
                processor.tiling = tiling
            if combine is not None:
                model.config.tile_combine = combine
            model.to(self.device).eval()
            key = model_key(name)
            if any(m.key == key for m in self.models):
                key = f"{key}-{len(self.models)}"
            scoring = ScoringModel(key, model, processor)
            self.models.append(scoring)
            signature = (backbone_fingerprint(model), repr(sorted(processor.to_dict().items())))
            if signature not in groups:
                groups[signature] = len(self.groups)
                self.groups.append([])
            self.groups[groups[signature]].append(scoring)

    @property
    def processors(self):
        """One processor per group: what the decoding workers must produce."""
        return [group[0].processor for group in self.groups]

    def columns(self):
        """Score columns in output order: `<model>:<label>` for each label, then `<model>:top_label`."""
        names = []
        for m in self.models:
            names += [f"{m.key}:{label}" for label in m.model.config.id2label.values()] + [f"{m.key}:top_label"]
        return names

    def preprocess(self, image):
        """PIL image -> per group (real tiles (k, 3, S, S) float32, tile slots) for `collate`."""
        out = []
        for processor in self.processors:
            views = processor.views(image)
            out.append((np.stack([processor.clip_preprocess(view) for view in views]), processor.tile_slots()))
        return out

    def draft_short(self, width, height):
        """The smallest short side an image of this size can be decoded at without changing what any
        processor does with it, or None when it needs full resolution (tiles are cut at full size)."""
        needs = []
        for processor in self.processors:
            crop, limit = processor.size["shortest_edge"], processor.tile_resize_limit
            if processor.is_tiled(width, height):
                if max(width, height) <= limit:
                    return None
                needs.append(limit)  # resized to this short side before tiling
            else:
                needs.append(crop)
        need = max(needs)
        return need if min(width, height) >= 2 * need else None  # JPEG scales by 1/2, 1/4, 1/8 only

    @torch.inference_mode()
    def outputs(self, grouped_inputs):
        """Yields (ScoringModel, CityClassifierOutput, tile_mask) for every model: the backbone runs
        once per group on the real tiles, each head reads the shared embeddings.

        grouped_inputs: per group (pixels of the real tiles (n, 3, S, S), tile_mask (batch, tiles)), from `collate`."""
        for group, (pixels, tile_mask) in zip(self.groups, grouped_inputs):
            tile_mask = tile_mask.to(self.device)
            embeds = group[0].model.get_image_features(pixels.to(self.device, self.dtype, non_blocking=True))
            image_embeds = scatter_tiles(embeds, tile_mask)
            for m in group:
                yield m, m.model(image_embeds=image_embeds, tile_mask=tile_mask), tile_mask

    def score(self, grouped_inputs):
        """One dict of score columns per image (see `columns`)."""
        rows = None
        for m, output, _ in self.outputs(grouped_inputs):
            scores = output.scores.float().cpu().numpy()
            if rows is None:
                rows = [{} for _ in scores]
            labels = list(m.model.config.id2label.values())
            for row, values in zip(rows, scores):
                for label, value in zip(labels, values):
                    row[f"{m.key}:{label}"] = float(value)
                row[f"{m.key}:top_label"] = labels[int(np.argmax(values))] if len(labels) > 1 else None
        return rows or []
