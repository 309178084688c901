"""Head-only training's embedding pass: the frozen backbone embeds every view of every image once,
fed by the same decoding workers as classify.py, and the embeddings are cached by datasets."""

import hashlib
import json
import logging
import os

import numpy as np
import torch

from citytools.training_data import IMAGE, LABEL, decode, label_tensor

logger = logging.getLogger("train_hf")


def views_fingerprint(model, processor):
    """Identifies the frozen backbone's weights and the views, to name the cached embeddings."""
    from citytools.models import backbone_fingerprint

    views = json.dumps(processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256((backbone_fingerprint(model) + views).encode()).hexdigest()[:16]


class ImageViews(torch.utils.data.Dataset):
    """Image i of a dataset -> (i, its real tiles (`citytools.views.view_tiles`)), decoded in a DataLoader
    worker; the index lets batches be taken as the workers finish them (`embed_all`)."""

    def __init__(self, ds, processor, mode):
        self.ds, self.processor, self.mode = ds.select_columns([IMAGE]), processor, mode  # citytools.views.crop_mode

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        """-> (index, [(real tiles, tile slots, {})]): one group, as `citytools.loading.collate` takes
        it (no native inputs: head-only training does not train models that read them)."""
        from citytools.views import view_tiles

        return index, [(view_tiles(self.processor, decode(self.ds[index][IMAGE]), None, self.mode),
                        self.processor.tile_slots(), {})]


class EmbeddedViews(torch.utils.data.Dataset):
    """Head-only training rows from the cached embeddings, held in memory: per image and step, the
    embedding of one of its real tiles at random (each DataLoader process draws from its own seed).
    Batch-1 head steps are all fixed cost, so rows come from memory, not from Arrow, on every step.

    On a GPU the rows live on the GPU when they take under a quarter of its free memory (`on_device`):
    a step then copies nothing to it (pinning and two copies that wait for the GPU, every step); the
    training loader must then neither pin nor use worker processes (see `main`)."""

    def __init__(self, ds, labels_of, device=None):
        columns = ds.with_format("numpy")
        self.embeds = torch.from_numpy(np.asarray(columns["image_embeds"], dtype=np.float32))
        self.valid = [np.flatnonzero(mask) for mask in np.asarray(columns["tile_mask"])]
        self.labels = label_tensor(labels_of({LABEL: list(ds.with_format(None)[LABEL])}))
        self.on_device = (device is not None and device.type == "cuda"
                          and 4 * self.embeds.nbytes < torch.cuda.mem_get_info(device)[0])
        if self.on_device:
            self.embeds, self.labels = self.embeds.to(device), self.labels.to(device)
        self.rng, self.pid = None, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if self.pid != os.getpid():
            self.rng, self.pid = np.random.default_rng(torch.initial_seed()), os.getpid()
        tile = self.valid[index][self.rng.integers(len(self.valid[index]))]
        return {"image_embeds": self.embeds[index, tile], "labels": self.labels[index]}


def embedding_precision(training_args):
    """The dtype the frozen backbone embeds in: fp16 (bf16 with --bf16) on a GPU; on a CPU bf16 only
    with --bf16 on a CPU that has it. The model keeps its stem and head in float32 under either, so
    the embeddings agree with float32 ones (tests/test_precision.py, docs/model.md#precision)."""
    from citytools.devices import cpu_has_bf16

    if training_args.device.type == "cuda":
        return torch.bfloat16 if training_args.bf16 else torch.float16
    return torch.bfloat16 if training_args.bf16 and cpu_has_bf16() else torch.float32


def embed_all(ds, model, processor, batch_size, device, precision, workers, crop="auto", warm_up=None):
    """(embeddings (images, tiles, dim) float32, tile_mask (images, tiles)) of every image, on `device`:
    decoding in `workers` processes feeding batches, taken as they finish (a worker on a large image
    holds up no other) and put back in dataset order, pinned memory and non-blocking copies on a GPU,
    which also resizes and cuts the views (`crop`: see citytools.views.crop_mode), the backbone under
    autocast in `precision`. `warm_up` (default: on a GPU): a blank batch first, while the workers
    start (see citytools.scorer.Scorer.warm_up)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from citytools.devices import InFlight, Queued, cpu_threads, model_threads, to_host
    from citytools.loading import Stopwatch, blank_image, collate, loader_batches
    from citytools.views import crop_mode, model_pixels, view_tiles

    views = ImageViews(ds, processor, crop_mode(device, [processor], crop))
    for module in model.backbone_modules():
        module.to(device)
    on_gpu = device.type == "cuda"  # its work is queued: batches go as soon as it is idle
    warm_up = on_gpu if warm_up is None else warm_up
    autocast = torch.autocast(device.type, dtype=precision) if precision != torch.float32 else nullcontext()
    embeds, masks, order, in_flight, stopwatch = [], [], [], InFlight(), Stopwatch()

    def embed(tiles, mask):
        """Queues one batch; the mask stays on the host and the embeddings come back without waiting."""
        return to_host(model.embed_tiles(model_pixels(processor, tiles, mask, device), mask).float())

    def blank_batch():  # while the workers decode their first images
        if warm_up:
            tiles = view_tiles(processor, blank_image([processor]), None, views.mode)
            with stopwatch("warm_up"):
                embed(*collate([(None, [(tiles, processor.tile_slots(), {})])] * 4)[1][0][:2])
                if on_gpu:
                    torch.cuda.synchronize(device)

    bar = tqdm(total=len(views), unit="img", desc=f"Embedding views on {device.type}")
    threads = None if on_gpu else model_threads(model.num_parameters(), workers)
    try:
        with cpu_threads(threads), torch.inference_mode(), autocast:
            batches = loader_batches(views, batch_size, workers, device, in_order=False, on_start=blank_batch,
                                     idle=in_flight.idle if on_gpu else None)
            for indices, [(tiles, mask, _)] in stopwatch.timed(batches, "first_batch", "waiting_for_images"):
                bar.update(len(indices))
                with stopwatch("model"):
                    embeds.append(embed(tiles, mask))  # the GPU embeds it while the next one is cut and queued
                    masks.append(mask)
                    order += indices
                    in_flight.finish(in_flight.swap(Queued(device)))  # one batch ahead at most
        with stopwatch("model"):
            in_flight.finish(in_flight.take())  # then the last batch's embeddings are in host memory
    finally:
        bar.close()
    logger.info("embedding pass, %d images: %s", len(views), stopwatch.line())
    if sorted(order) != list(range(len(views))):  # each image once: never a silently shifted embedding
        raise RuntimeError(f"the embedding pass got {len(order)} images for {len(views)}")
    back = np.argsort(order)  # arrival order -> dataset order
    return torch.cat(embeds).numpy()[back], torch.cat(masks).numpy()[back]


def embed_views(ds, model, processor, batch_size, device, precision, workers):
    """Adds `image_embeds` (tiles, dim) and `tile_mask` (tiles,) columns, cached by fingerprint: on a
    rerun with the same data, backbone, views and precision nothing is embedded again."""
    # named by the data and the backbone, not by hashing a function (which would pickle the whole model)
    key = f"{ds._fingerprint}-{views_fingerprint(model, processor)}-{precision}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    computed = {}

    def add(batch, indices):  # runs only when the cache misses; the first call embeds everything
        if not computed:
            computed["embeds"], computed["mask"] = embed_all(ds, model, processor, batch_size, device, precision,
                                                             workers)
        return {"image_embeds": computed["embeds"][indices], "tile_mask": computed["mask"][indices]}

    return ds.map(add, batched=True, batch_size=1000, with_indices=True, new_fingerprint=fingerprint,
                  desc="Storing embeddings (cached)")


def embed_splits(model, processor, splits, training_args):
    """Head-only training: freezes the backbone and gives each split (None stays None) its cached
    embeddings, computed on the training device."""
    from citytools.devices import default_batch_size, default_workers

    for module in model.backbone_modules():
        module.requires_grad_(False)
    device = training_args.device
    batch_size = max(default_batch_size(device, model), training_args.per_device_eval_batch_size)
    workers = training_args.dataloader_num_workers or default_workers(device)
    precision = embedding_precision(training_args)
    return [embed_views(ds, model, processor, batch_size, device, precision, workers) if ds is not None else None
            for ds in splits]
