"""The scoring engine every tool shares: batched multi-model inference with one backbone pass per
tile for models that share backbone weights."""

import hashlib
import json

import numpy as np
import torch

from citytools.devices import pick_device, pick_dtype, ready_event, to_host
from citytools.loading import blank_image, collate
from citytools.models import ScoringModel, backbone_fingerprint, load_scoring_model, model_key
from citytools.remote import CPU_CHUNK_BYTES, to_device
from citytools.results import score_columns
from citytools.toolkit import weights_fingerprint
from citytools.views import crop_mode, device_crops, model_pixels, view_tiles


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
            for option in ("native_fringes", "native_patches"):
                native = getattr(model.config, option, None)
                if native and getattr(processor, option, None) != native:
                    raise ValueError(f"{name}: the model reads {option} with {native}, its processor makes "
                                     f"{getattr(processor, option, None)}: save the model's processor with "
                                     f"{option} set as in its config")
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
        """Score columns in output order (citytools.results.score_columns), model after model."""
        return [c for m in self.models for c in score_columns(m.key, m.model.config.id2label.values())]

    def preprocess(self, image, tiling=None):
        """PIL image -> per group (real tiles from `view_tiles`, tile slots, the picture's native inputs
        by name, `processor.native_inputs`) for `collate`. `tiling` overrides the scorer's for this call."""
        out, measured = [], {}  # groups measuring with the same settings share one measurement
        for group in self.groups:
            processor, on = group[0].processor, group[0].tiling if tiling is None else tiling
            tiles = view_tiles(processor, image, on, self.crop_mode)
            slots = max(processor.tile_slots(on), len(tiles))  # grid tiling: may be more than 5
            spec = repr((processor.native_fringes, processor.native_patches))
            if spec not in measured:
                measured[spec] = processor.native_inputs(image)
            out.append((tiles, slots, measured[spec]))
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

        grouped_inputs: per group (the real tiles, tile_mask (batch, tiles), the native inputs by name),
        from `collate`."""
        for group, (pixels, host_mask, native) in zip(self.groups, grouped_inputs):
            if isinstance(pixels, list):  # whole images: the device cuts their views
                pixels = device_crops(group[0].processor, pixels, host_mask, self.device)
            tile_mask = to_device(host_mask, self.device)
            chunks = (model_pixels(group[0].processor, chunk, None, self.device)
                      for chunk in pixels.split(self.chunk_views(pixels)))
            image_embeds = group[0].model.embed_tiles(chunks, host_mask)  # the mask on the host: no wait
            for m in group:
                yield m, m.model(image_embeds=image_embeds, tile_mask=tile_mask, **native,
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
            *label_columns, top_column = score_columns(m.key, labels)
            for row, values in zip(rows, table):
                row.update(zip(label_columns, values.tolist()))
                row[top_column] = labels[int(np.argmax(values))] if len(labels) > 1 else None
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
