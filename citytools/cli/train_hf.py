"""Trains a CityClassifier with the Hugging Face Trainer on a `datasets` image folder or Hub dataset.

Labels follow the original's folder convention: images in `0_reg/`, `0_reg_booru/`, `1_chroma/`...
get the number before the first underscore as their label id, so several folders can feed one
label. Folders without such a number (or a Hub dataset's ClassLabel names) use the ClassLabel
index instead. Name the labels with --class_names.

Two modes:
  * head only (default with a pretrained CLIP, the original's recipe): the backbone is frozen, its
    embeddings of every view (5 tiles or the whole image) are computed once and cached by datasets'
    fingerprints, and the head trains on a random view per step, evaluates on all views combined;
  * full (--train_backbone, default when the backbone is built from --vision_config): backbone and
    head train together on random (2 x CLIP size) crops, the original's RandomCrop augmentation.

Every option can also come from one JSON file: python train_hf.py args.json
"""

import csv
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from citytools.cli.convert_original import model_from_clip
from citytools.remote import (
    ROOT,
    CityClassifierConfig,
    CityClassifierForImageClassification,
    CityClassifierImageProcessor,
)
from citytools.toolkit import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    UsageError,
    check_hub,
    first_line,
    label_from_folder,
    labels_from_folders,
    load_dataset,
)

logger = logging.getLogger("train_hf")
IMAGE, LABEL = "image", "label"  # the columns are renamed to these on loading


@dataclass
class DataArguments:
    dataset_name: str = field(
        metadata={"help": "A local image folder (with train/ validation/ test/ splits) or a Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="validation", metadata={"help": "Split to evaluate on; none to skip."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels."})
    class_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated names for label ids 0, 1, ... (e.g. 'Pass,Chromatic Aberration')."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation images."})
    cache_views: int = field(
        default=0,
        metadata={"help": "Full mode: decode each training image once and cache this many random crops of it "
                          "(0: decode and crop live every step). Trades disk for CPU."},
    )
    top_loss_images: int = field(default=15, metadata={"help": "List this many training images with the highest loss."})
    top_loss_scan: int = field(
        default=2000, metadata={"help": "In full mode, look for them among this many random training images."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A CityClassifier folder/Hub id to fine-tune, or a CLIP folder/Hub id for a new head "
                          "(the original: openai/clip-vit-large-patch14-336)."},
    )
    vision_config: str | None = field(
        default=None,
        metadata={"help": "JSON of CLIPVisionConfig fields for a backbone trained from scratch, "
                          "e.g. '{\"hidden_size\": 192, \"num_hidden_layers\": 4, ...}'."},
    )
    stem: str | None = field(
        default=None,
        metadata={"help": "With --vision_config: JSON of a convolutional stem in front of CLIP (a hybrid ViT), e.g. "
                          "'{\"channels\": [16, 16], \"kernel_sizes\": [5, 3], \"strides\": [1, 2], \"pool\": 4}' "
                          "(convs with GELU, then a max-pool). CLIP's image_size is then the view size divided "
                          "by the strides' product times pool."},
    )
    stem_aux_loss_weight: float = field(
        default=1.0, metadata={"help": "With --stem: weight of the training loss of a linear probe on the stem's "
                                       "pooled features (deep supervision; 0 turns it off)."})
    train_backbone: bool | None = field(
        default=None, metadata={"help": "Train the backbone too (default: only when built from --vision_config)."}
    )
    arch: str = field(default="class", metadata={"help": "class or score."})
    head_hidden_size: int = field(default=1024, metadata={"help": "Width of the head (the original: 1024)."})
    label_loss_weights: str | None = field(
        default=None, metadata={"help": "Comma-separated loss weight per label id (the original CA model: '1.0,0.5')."}
    )
    tile_combine: str = field(default="mean", metadata={"help": "mean, median, max or min."})
    fringe_features: bool = field(
        default=False,
        metadata={"help": "Give the head measurements of how far red and blue edges sit from green ones in each "
                          "view, beside CLIP's embedding (config.fringe_features). A CityClassifier without them "
                          "gets them with zero weights, so training starts from its exact scores."})


def parse_args(argv=None):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((DataArguments, ModelArguments, TrainingArguments), description=__doc__)
    argv = sys.argv[1:] if argv is None else argv
    defaults = {"lr_scheduler_type": "cosine", "remove_unused_columns": False, "eval_strategy": "epoch",
                "save_strategy": "epoch", "load_best_model_at_end": True, "report_to": "none",
                "save_total_limit": 2, "logging_steps": 50}
    # bf16 autocast also runs on CPUs (fast on AVX512-BF16/AMX ones), but TrainingArguments only
    # accepts it there with use_cpu: say it for the user when there is no GPU, so one config runs on both.
    cpu_bf16 = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if len(argv) == 1 and argv[0].endswith(".json"):
        given = json.loads(Path(argv[0]).read_text())
        values = {**defaults, **given}
        if values.get("bf16") == "auto":
            values["bf16"] = native_bf16()
        if cpu_bf16 and values.get("bf16"):
            values["use_cpu"] = True
        asked = set(given)
        parse = lambda **changes: parser.parse_dict({**values, **changes})  # noqa: E731
    else:
        parser.set_defaults(**defaults)
        argv = [str(native_bf16()) if a == "auto" and i and argv[i - 1] == "--bf16" else
                f"--bf16={native_bf16()}" if a == "--bf16=auto" else a for i, a in enumerate(argv)]
        if cpu_bf16 and bf16_asked(argv) and "--use_cpu" not in argv:
            argv = [*argv, "--use_cpu", "true"]
        asked = {a.split("=")[0].removeprefix("--") for a in argv if a.startswith("--")}

        def parse(**changes):
            parser.set_defaults(**changes)
            return parser.parse_args_into_dataclasses(argv)
    try:
        try:
            data, model, training = parse()
        except ValueError as error:
            if "load_best_model_at_end" in asked or "load_best_model_at_end" not in str(error):
                raise
            # this tool's default, not the user's choice: it gives way to the strategies they chose
            data, model, training = parse(load_best_model_at_end=False)
            print("note: the best checkpoint is not loaded at the end (load_best_model_at_end, on by default "
                  "here, needs the save and evaluation strategies to match)", file=sys.stderr)
    except ValueError as error:  # TrainingArguments' checks: one line, exit status 2
        raise UsageError(" ".join(str(error).split())) from None
    if training.bf16 and cpu_bf16 and not native_bf16():
        print("note: --bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and much slower than "
              "float32; --bf16 auto uses it only where it is native", file=sys.stderr)
    training.remove_unused_columns = False  # set_transform needs the raw image column
    if training.load_best_model_at_end and not {"metric_for_best_model", "greater_is_better"} & asked:
        # TrainingArguments has made it "loss" already: a classifier's best checkpoint is its best ROC AUC
        training.metric_for_best_model = "roc_auc" if model.arch == "class" else "loss"
        training.greater_is_better = model.arch == "class"
    return data, model, training


def bf16_asked(argv):
    """Whether a command line turns bf16 on: `--bf16`, `--bf16 true`, `--bf16=true` (or yes, 1)."""
    for i, arg in enumerate(argv):
        if arg == "--bf16":
            value = argv[i + 1] if i + 1 < len(argv) else "--"
            return value.startswith("--") or value.lower() in ("true", "yes", "1", "t", "y")
        if arg.startswith("--bf16="):
            return arg.split("=", 1)[1].lower() in ("true", "yes", "1", "t", "y")
    return False


def native_bf16():
    """`--bf16 auto`: bf16 where the hardware computes it natively, a GPU that supports it or a CPU
    with AVX512-BF16/AMX; float32 elsewhere. The stem and the head train in float32 either way (the
    model turns autocast off for them), so the trained model scores the same in every dtype."""
    from citytools.devices import cpu_has_bf16

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


# --------------------------------------------------------------------------------------------- data


def load_splits(data_args):
    """{split: Dataset} for the train and eval splits, images not decoded yet."""
    import datasets

    dataset = load_dataset(data_args.dataset_name, config=data_args.dataset_config_name, drop_labels=False)
    wanted = [data_args.train_split] + ([data_args.eval_split] if data_args.eval_split else [])
    splits = {}
    for split in wanted:
        if split not in dataset:
            raise UsageError(f"{data_args.dataset_name}: no split {split!r} (has {', '.join(dataset)})")
        ds = dataset[split].cast_column(data_args.image_column, datasets.Image(decode=False))
        if data_args.label_column not in ds.column_names and data_args.image_column in ds.column_names:
            ds = ds.add_column(data_args.label_column, labels_from_folders(ds[data_args.image_column]))
        for column in (data_args.image_column, data_args.label_column):
            if column not in ds.column_names:
                raise UsageError(f"{data_args.dataset_name}: split {split!r} has no column {column!r} "
                                 f"(has {', '.join(ds.column_names)}); are the images in label folders?")
        limit = data_args.max_train_samples if split == data_args.train_split else data_args.max_eval_samples
        if limit is not None:
            ds = ds.shuffle(seed=0).select(range(min(limit, len(ds))))
        ds = ds.rename_columns({c: n for c, n in ((data_args.image_column, IMAGE), (data_args.label_column, LABEL))
                                if c != n})
        splits[split] = ds
    return splits


def label_mapping(ds, data_args):
    """Maps the label column's values to label ids: ClassLabel names by the folder rule (names that do
    not follow it map to None: unlabelled). Only a Hub dataset whose names all lack a number uses the
    ClassLabel index: a local folder's `pass/` and `aberration/` would otherwise become labels 1 and 0
    by alphabetical order, silently."""
    names = getattr(ds.features[LABEL], "names", None)
    if names is None:
        return lambda value: None if value is None else int(value)
    ids = [label_from_folder(name) for name in names]
    if all(i is None for i in ids) and not Path(data_args.dataset_name).is_dir():
        return lambda value: None if value is None else int(value)
    return lambda value: None if value is None else ids[value]


def check_dataset(splits, data_args, arch):
    """-> (splits without their unreadable images, label ids, how many were left out). Every image is
    decoded once, as training decodes it (datasets caches the outcome for reruns): one that fails gets
    an error line and is left out, and training goes on (a truncated JPEG passes Pillow's verify() and
    used to end training midway with a traceback). Unlabelled images, or a single class in the train
    or the evaluation split, stop it before it starts."""
    problems, label_sets, checked, left_out = [], {}, {}, 0
    for split, ds in splits.items():
        to_id = label_mapping(ds, data_args)
        seen, keep, errors = set(), [], decode_errors(ds)
        for index, (row, error) in enumerate(zip(ds, errors)):
            image, value = row[IMAGE], row[LABEL]
            where = image.get("path") or f"{split}[{index}]"
            label = to_id(value) if arch == "class" else value
            if label is None:
                problems.append(Path(where).parent.name if image.get("path") else where)
            elif error is not None:
                print(f"error: {where}: unreadable image ({error}); left out", file=sys.stderr)
            else:
                seen.add(label if arch == "class" else None)
                keep.append(index)
        if len(keep) < len(ds):
            print(f"note: {len(ds) - len(keep)} of the {len(ds)} images of split {split!r} left out", file=sys.stderr)
        left_out += len(ds) - len(keep)
        label_sets[split], checked[split] = seen, ds if len(keep) == len(ds) else ds.select(keep)
    if problems:
        where = sorted(set(problems))
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        raise UsageError(f"{data_args.dataset_name}: {len(problems)} image(s) without a label id, in {shown}: put "
                         "them in folders named like 0_pass/ or 1_aberration/ (the number before the first "
                         "underscore is the label)")
    for split, labels in label_sets.items():
        if arch == "class" and len(labels) < 2:
            need = "a classifier needs at least two" if split == data_args.train_split else \
                'evaluating a classifier (ROC AUC) needs two (or pass --eval_split "" to train without it)'
            raise UsageError(f"{data_args.dataset_name}: the {split!r} split has only label(s) {sorted(labels)}; "
                             f"{need}")
    return checked, sorted(set().union(*label_sets.values())) if arch == "class" else None, left_out


def decode_errors(ds):
    """Per image of a split, why it cannot be decoded as training decodes it (`decode`), or None;
    in parallel processes for large splits, cached by datasets with the split."""
    workers = min(os.cpu_count() or 1, len(ds) // 250)
    checked = ds.map(decode_error_column, batched=True, batch_size=50, input_columns=[IMAGE],
                     remove_columns=ds.column_names, num_proc=workers if workers > 1 else None,
                     desc="decoding every image once")
    return checked["decode_error"]


def decode_error_column(images):
    """`datasets.map` batch of Image(decode=False) values -> {"decode_error": [reason or None, ...]}."""
    from citytools.images import BadImage

    errors = []
    for image in images:
        try:
            decode(image)
            errors.append(None)
        except BadImage as error:
            errors.append(str(error))
        except Exception as error:  # noqa: BLE001 - any decoder failure is the same user problem
            errors.append(first_line(error))  # printed as one line
    return {"decode_error": errors}


def decode(image):
    """Decodes a `datasets` Image(decode=False) value as classify.py does (EXIF rotation, first frame, bomb limit)."""
    from citytools.images import load_dataset_image

    return load_dataset_image(image)


def random_view(processor, image, rng):
    """A training view as (S, S, 3) uint8: the inference resize rule, one random (2 x S) crop where
    inference would tile (the original's RandomCrop), CLIP's resize, and a random flip."""
    from citytools.remote import resize_for_tiling

    tile = 2 * processor.size["shortest_edge"]
    view = processor.prepare(image, tiling=True)
    if processor.is_tiled(*view.size, tiling=True):
        view = resize_for_tiling(view, processor.tile_resize_limit)
        x, y = int(rng.integers(0, view.width - tile + 1)), int(rng.integers(0, view.height - tile + 1))
        view = view.crop((x, y, x + tile, y + tile))
    pixels = processor.resize_and_crop(view)
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


# -------------------------------------------------------------------------------------------- model


def build_model(model_args, label_ids, label_names):
    """(model, processor, train_backbone) from a CityClassifier, a CLIP, or a fresh --vision_config."""
    from transformers import CLIPVisionConfig, PretrainedConfig

    num_labels = (max(label_ids) + 1) if model_args.arch == "class" else 1
    if model_args.arch == "class":
        names = label_names or [str(i) for i in range(num_labels)]
        if len(names) != num_labels:
            raise UsageError(f"--class_names: {len(names)} names for {num_labels} labels (ids 0..{num_labels - 1})")
        labels = {"id2label": dict(enumerate(names))}
        if model_args.label_loss_weights:
            labels["label_loss_weights"] = loss_weights(model_args.label_loss_weights, num_labels)
    else:
        labels = {}
    head = {"arch": model_args.arch, "head_hidden_size": model_args.head_hidden_size,
            "tile_combine": model_args.tile_combine, "fringe_features": model_args.fringe_features or None, **labels}

    if model_args.vision_config:
        try:
            vision = CLIPVisionConfig(**json.loads(model_args.vision_config))
        except (ValueError, TypeError) as error:  # not JSON, not an object, or a field CLIPVisionConfig refuses
            raise UsageError(f"--vision_config: not a CLIP vision config ({first_line(error)})") from None
        try:
            stem = json.loads(model_args.stem) if model_args.stem else None
            config = CityClassifierConfig(vision_config=vision, stem=stem,
                                          stem_aux_loss_weight=model_args.stem_aux_loss_weight if stem else 0.0, **head)
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"--stem/--vision_config: {error}") from None
        model = CityClassifierForImageClassification(config)
        size = config.pixel_size
        processor = CityClassifierImageProcessor(
            tiling=model_args.arch == "class", size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return model, processor, model_args.train_backbone is not False
    if model_args.stem:
        raise UsageError("--stem builds a new backbone: give it with --vision_config")
    if not model_args.model_name_or_path:
        raise UsageError("give --model_name_or_path (a CLIP or CityClassifier model) or --vision_config")
    try:  # the config's fields only: a model folder's own code is never run
        config = PretrainedConfig.get_config_dict(model_args.model_name_or_path)[0]
    except (OSError, ValueError) as error:
        raise UsageError(f"{model_args.model_name_or_path}: cannot load a config "
                         f"({first_line(error)})") from None
    if config.get("model_type") == "cityclassifier":
        try:
            model = CityClassifierForImageClassification.from_pretrained(model_args.model_name_or_path)
        except (OSError, ValueError) as error:  # no weights, or not all of them
            raise UsageError(f"{model_args.model_name_or_path}: cannot load the model ({first_line(error)})") from None
        for name in ("arch", "head_hidden_size", "tile_combine"):  # the model's own; never silently another
            given = getattr(model_args, name)
            if given != ModelArguments.__dataclass_fields__[name].default and given != getattr(model.config, name):
                raise UsageError(f"--{name} {given}: {model_args.model_name_or_path} is a CityClassifier with "
                                 f"{name} {getattr(model.config, name)}, which fine-tuning keeps")
        if model.config.num_labels != num_labels:
            raise UsageError(f"{model_args.model_name_or_path}: has {model.config.num_labels} labels, "
                             f"the data {num_labels}")
        processor = CityClassifierImageProcessor.from_pretrained(model_args.model_name_or_path)
        if model_args.fringe_features:
            model.add_fringe_features()
        if "label_loss_weights" in labels:  # a training setting: it applies to a model being fine-tuned too
            model.config.label_loss_weights = labels["label_loss_weights"]
        return model, processor, bool(model_args.train_backbone)
    try:
        model, processor = model_from_clip(model_args.model_name_or_path, tiling=model_args.arch == "class", **head)
    except ValueError as error:  # a head setting CityClassifierConfig refuses
        raise UsageError(f"{model_args.model_name_or_path}: {first_line(error)}") from None
    return model, processor, bool(model_args.train_backbone)


def loss_weights(text, num_labels):
    """--label_loss_weights "1.0,0.5" -> [1.0, 0.5]: one positive number per label, or a UsageError."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != num_labels or not all(w > 0 and np.isfinite(w) for w in weights):
        raise UsageError(f"--label_loss_weights {text}: {num_labels} positive numbers needed, one per label")
    return weights


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
        """-> (index, [(real tiles, tile slots)]): one group, as `citytools.loading.collate` takes it."""
        from citytools.views import view_tiles

        return index, [(view_tiles(self.processor, decode(self.ds[index][IMAGE]), None, self.mode),
                        self.processor.tile_slots())]


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

    from citytools.devices import model_threads, ready_event, to_host
    from citytools.loading import Stopwatch, blank_image, collate, loader_batches
    from citytools.views import crop_mode, model_pixels, view_tiles

    views = ImageViews(ds, processor, crop_mode(device, [processor], crop))
    for module in model.backbone_modules():
        module.to(device)
    on_gpu = device.type == "cuda"  # its work is queued: batches go as soon as it is idle
    warm_up = on_gpu if warm_up is None else warm_up
    threads = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(model_threads(model.num_parameters(), workers))
    autocast = torch.autocast(device.type, dtype=precision) if precision != torch.float32 else nullcontext()
    embeds, masks, order, previous, stopwatch = [], [], [], None, Stopwatch()

    def embed(tiles, mask):
        """Queues one batch; the mask stays on the host and the embeddings come back without waiting."""
        return to_host(model.embed_tiles(model_pixels(processor, tiles, mask, device), mask).float())

    def blank_batch():  # while the workers decode their first images
        if warm_up:
            tiles = view_tiles(processor, blank_image([processor]), None, views.mode)
            with stopwatch("warm_up"):
                embed(*collate([(None, [(tiles, processor.tile_slots())])] * 4)[1][0])
                if on_gpu:
                    torch.cuda.synchronize(device)

    bar = tqdm(total=len(views), unit="img", desc=f"Embedding views on {device.type}")
    try:
        with torch.inference_mode(), autocast:
            batches = loader_batches(views, batch_size, workers, device, in_order=False, on_start=blank_batch,
                                     idle=(lambda: previous is None or previous.query()) if on_gpu else None)
            for indices, [(tiles, mask)] in stopwatch.timed(batches, "first_batch", "waiting_for_images"):
                bar.update(len(indices))
                with stopwatch("model"):
                    embeds.append(embed(tiles, mask))  # the GPU embeds it while the next one is cut and queued
                    masks.append(mask)
                    order += indices
                    queued = ready_event(device)
                    if previous is not None:  # one batch ahead at most
                        previous.synchronize()
                    previous = queued
        with stopwatch("model"):
            if previous is not None:  # the last batch's embeddings are in host memory
                previous.synchronize()
    finally:
        bar.close()
        torch.set_num_threads(threads)
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


# -------------------------------------------------------------------------------------------- train


class HeadOnlyTrainer(Trainer):
    """Trainer for head-only training: while it trains, the frozen backbone (the stem and the CLIP
    tower) is set aside out of the model's module tree, and put back whenever weights are saved, so
    every checkpoint and the final model are whole. A checkpoint loaded meanwhile (a resumed run,
    the best model at the end) loads into the head: torch skips the keys of a submodule set to None,
    and the backbone is frozen, the very weights the checkpoint holds.

    Trainer walks the whole model on every step (`model.train()`, `zero_grad()`, the gradient norm
    over `parameters()`): with a ViT-L backbone that walk is most of a batch-1 head step, which is
    all fixed cost (bench/bench_head_steps.py measures both ways). Under DeepSpeed, FSDP or
    torch.compile, which take their own copies of the weights, nothing is set aside."""

    _aside = {}  # backbone modules by attribute name, while set aside

    def train(self, *args, **kwargs):
        model = self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.torch_compile:
            return super().train(*args, **kwargs)
        asked = [name for name in ("gradient_checkpointing", "activation_checkpointing") if getattr(self.args, name, 0)]
        if asked:  # it would look for checkpointed layers in the head alone, and fail
            logger.info("head-only training: --%s left off (the backbone does not run while the head trains)", asked[0])
            for name in asked:
                setattr(self.args, name, False)
        backbone = [id(module) for module in model.backbone_modules()]
        self._aside = {name: module for name, module in model.named_children() if id(module) in backbone}
        model._modules.update(dict.fromkeys(self._aside))
        try:
            return super().train(*args, **kwargs)
        finally:
            model._modules.update(self._aside)
            self._aside = {}

    def _save(self, *args, **kwargs):
        self.model._modules.update(self._aside)
        try:
            return super()._save(*args, **kwargs)
        finally:
            self.model._modules.update(dict.fromkeys(self._aside))


def write_loss_history(log_history, output_dir):
    """Trainer's log history (every step of the run, those before a resume included: Trainer restores
    it from the checkpoint) as loss.csv, and the original's loss plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in log_history if "step" in row]
    keys = ["step"] + sorted({key for row in rows for key in row} - {"step"})
    with open(Path(output_dir) / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    for name, key, title in (("loss.png", "loss", "training loss"), ("loss-eval.png", "eval_loss", "eval loss")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(Path(output_dir) / name, dpi=100)
        plt.close(fig)


def compute_metrics_fn(arch):
    import evaluate

    metric = evaluate.load(str(ROOT / "metrics" / "classification"))

    def compute_metrics(eval_pred):
        scores = eval_pred.predictions[1] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        references = eval_pred.label_ids
        if arch == "score":
            return {"mae": float(np.abs(scores[:, 0] - references).mean())}
        result = metric.compute(predictions=scores.argmax(-1), references=references, scores=scores)
        return {k: v for k, v in result.items() if not isinstance(v, dict)}

    return compute_metrics


def highest_loss(model, ds, paths, batch_size, count):
    """The training images the model fits worst (likely mislabelled): path, label, loss, label score."""
    model.eval()
    rows = []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(**batch)
            labels = batch["labels"].long()
            losses = -out.scores.clamp_min(1e-38).log().gather(1, labels[:, None])[:, 0]  # cross-entropy
            label_scores = out.scores.gather(1, labels[:, None])[:, 0]
            for loss, label, score in zip(losses.tolist(), labels.tolist(), label_scores.tolist()):
                rows.append({"path": paths[len(rows)], "label": label, "loss": loss, "label_score": score})
    return sorted(rows, key=lambda r: r["loss"], reverse=True)[:count]


def inference_transform(processor, labels_of, embedded):
    """All views of each image, combined in the model, as at inference (evaluation, loss listing)."""
    if embedded:
        return lambda batch: {"image_embeds": torch.tensor(np.asarray(batch["image_embeds"], dtype=np.float32)),
                              "tile_mask": torch.tensor(np.asarray(batch["tile_mask"])),
                              "labels": labels_of(batch)}
    return lambda batch: {**processor([decode(image) for image in batch[IMAGE]], return_tensors="pt"),
                          "labels": labels_of(batch)}


def main(argv=None):
    from transformers import set_seed

    data_args, model_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    if model_args.arch not in ("class", "score"):
        raise UsageError(f"--arch must be class or score, got {model_args.arch!r}")
    if Path(training_args.output_dir).exists() and not Path(training_args.output_dir).is_dir():
        raise UsageError(f"--output_dir {training_args.output_dir}: is a file, not a folder")
    if training_args.push_to_hub:
        check_hub("--push_to_hub", training_args.hub_token)  # before any data is read or embedded
    resume = checkpoint_to_resume(training_args)

    splits, label_ids, left_out = check_dataset(load_splits(data_args), data_args, model_args.arch)
    names = data_args.class_names.split(",") if data_args.class_names else None
    model, processor, train_backbone = build_model(model_args, label_ids or [0], names)
    train_ds = splits[data_args.train_split]
    eval_ds = splits.get(data_args.eval_split) if data_args.eval_split else None
    train_labels = labels_of_split(train_ds, data_args, model_args.arch)
    if train_backbone:
        if data_args.cache_views:
            train_ds = cache_random_views(train_ds, processor, data_args, training_args.seed)
        train_ds.set_transform(full_mode_transform(processor, train_labels, training_args.seed))
        train_rows = train_ds
    else:
        train_ds, eval_ds = embed_splits(model, processor, [train_ds, eval_ds], training_args)
        train_rows = EmbeddedViews(train_ds, train_labels, training_args.device)
        if train_rows.on_device:  # rows on the GPU already: nothing to pin, no process may touch them
            training_args.dataloader_pin_memory, training_args.dataloader_num_workers = False, 0
            training_args.dataloader_prefetch_factor, training_args.dataloader_persistent_workers = None, False
    if eval_ds is not None:
        eval_labels = labels_of_split(eval_ds, data_args, model_args.arch)
        eval_ds.set_transform(inference_transform(processor, eval_labels, embedded=not train_backbone))
    else:
        training_args.eval_strategy = "no"
        training_args.load_best_model_at_end = False

    trainer = (Trainer if train_backbone else HeadOnlyTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_ds,
        data_collator=collate,
        processing_class=processor,  # saved with every checkpoint: each loads in a pipeline
        compute_metrics=compute_metrics_fn(model_args.arch),
    )
    trainer.train(resume_from_checkpoint=resume)

    output = Path(training_args.output_dir)
    trainer.save_model(str(output))  # the model and its processor
    write_loss_history(trainer.state.log_history, output)  # a resumed run's state holds the earlier steps too
    if eval_ds is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    if data_args.top_loss_images and model_args.arch == "class":
        list_highest_loss(trainer.model, splits[data_args.train_split], train_ds, train_backbone, processor,
                          train_labels, data_args, training_args, output)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return EXIT_SOME_FAILED if left_out else EXIT_OK


def labels_of_split(ds, data_args, arch):
    """batch -> its labels: label ids for class models, floats for score models."""
    if arch == "score":
        return lambda batch: [float(v) for v in batch[LABEL]]
    to_id = label_mapping(ds, data_args)
    return lambda batch: [to_id(v) for v in batch[LABEL]]


def full_mode_transform(processor, labels_of, seed):
    """`set_transform` for training the backbone: one random view per image and step (the inference
    resize rule, a random crop where inference tiles, CLIP's resize, a random flip), or a cached view
    flipped anew (--cache_views)."""
    rng = np.random.default_rng(seed)

    def transform(batch):
        if "view" in batch:  # cached views, raw bytes (Arrow decodes nested lists far slower)
            size = processor.crop_size["height"]
            views = [np.frombuffer(v, dtype=np.uint8).reshape(size, size, 3) for v in batch["view"]]
            views = [v[:, ::-1] if rng.random() < 0.5 else v for v in views]
        else:
            views = [random_view(processor, decode(image), rng) for image in batch[IMAGE]]
        pixels = processor.normalize_views(views)[:, None]  # (batch, 1, 3, S, S)
        return {"pixel_values": torch.from_numpy(pixels), "tile_mask": torch.ones(len(views), 1, dtype=torch.long),
                "labels": labels_of(batch)}

    return transform


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


def checkpoint_to_resume(training_args):
    """--resume_from_checkpoint, checked before any work: a path as given (refused in one line when it
    is not a complete checkpoint), or `last`/`true`: the newest complete checkpoint in the output
    folder, after a note for each newer one that a kill cut short."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        return None
    if checkpoint not in ("True", "true", "last"):
        problem = checkpoint_problem(Path(checkpoint))
        if problem:
            raise UsageError(f"--resume_from_checkpoint {checkpoint}: {problem}")
        return checkpoint
    folders = sorted((p for p in Path(training_args.output_dir).glob("checkpoint-*") if p.name[11:].isdigit()),
                     key=lambda p: int(p.name[11:]), reverse=True)
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        print(f"note: {folder} skipped: {problem} (cut short by a kill?)", file=sys.stderr)
    raise UsageError(f"{training_args.output_dir}: no complete checkpoint to resume from")


def checkpoint_problem(folder):
    """Why `folder` is not a checkpoint Trainer can resume from, or None: it must hold trainer_state.json
    and weights whose safetensors files are whole (a kill during the save leaves either out or short)."""
    from safetensors import safe_open

    if not folder.is_dir():
        return "no such checkpoint folder"
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"trainer_state.json does not read ({first_line(error)})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for file in weights:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # a truncated file fails here, tensor by tensor
                    f.get_slice(key)
        except Exception as error:  # noqa: BLE001 - any unreadable weights file: that checkpoint is broken
            return f"{file.name} is unreadable ({first_line(error)})"
    return None


def list_highest_loss(model, images, train_ds, train_backbone, processor, labels_of, data_args, training_args, output):
    """Writes highest_loss.csv: the original's "find the mislabelled image" aid."""
    if train_backbone:  # decoding every image again is slow: look at a sample
        scan = images.shuffle(seed=training_args.seed).select(range(min(len(images), data_args.top_loss_scan)))
    else:
        scan = train_ds
    paths = [image.get("path") for image in scan.with_format(None)[IMAGE]]
    scan.set_transform(inference_transform(processor, labels_of, embedded=not train_backbone))
    worst = highest_loss(model, scan, paths, training_args.per_device_eval_batch_size, data_args.top_loss_images)
    with open(output / "highest_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "loss", "label_score"])
        writer.writeheader()
        writer.writerows(worst)
    logger.info("training images with the highest loss (likely mislabelled): %s", output / "highest_loss.csv")
    for row in worst[:5]:
        logger.info("  loss %.3f  label %s  %s", row["loss"], row["label"], row["path"])


def cache_random_views(ds, processor, data_args, seed):
    """Decodes each training image once and keeps `cache_views` random views of it (S x S x 3 uint8 bytes)."""
    def crops(batch, indices):
        out = {"view": [], LABEL: []}
        for image, label, index in zip(batch[IMAGE], batch[LABEL], indices):
            rng = np.random.default_rng([seed, index])
            decoded = decode(image)
            for _ in range(data_args.cache_views):
                out["view"].append(np.ascontiguousarray(random_view(processor, decoded, rng)).tobytes())
                out[LABEL].append(label)
        return out

    return ds.map(crops, batched=True, batch_size=16, with_indices=True, remove_columns=ds.column_names,
                  num_proc=min(2, os.cpu_count() or 1), desc=f"Caching {data_args.cache_views} random views per image")


def collate(rows):
    """Stacks the transformed rows; labels become a tensor of ids (class) or floats (score)."""
    batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0] if key != "labels"}
    labels = [row["labels"] for row in rows]
    if isinstance(labels[0], torch.Tensor):  # EmbeddedViews: already a tensor of the right type (on the GPU)
        batch["labels"] = torch.stack(labels)
    else:
        batch["labels"] = label_tensor(labels)
    return batch


def label_tensor(labels):
    """Labels as a tensor: class ids (long), or float scores (score models)."""
    return torch.tensor(labels, dtype=torch.float32 if labels and isinstance(labels[0], float) else torch.long)
