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

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import Trainer

from citytools.embedding import EmbeddedViews, embed_splits
from citytools.models import model_from_clip
from citytools.remote import (
    CityClassifierConfig,
    CityClassifierForImageClassification,
    CityClassifierImageProcessor,
    native_patch_spec,
)
from citytools.toolkit import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    UsageError,
    check_hub,
    first_line,
)
from citytools.training import (
    DistillingTrainer,
    HeadOnlyTrainer,
    checkpoint_to_resume,
    compute_metrics_fn,
    fit_temperature,
    list_highest_loss,
    write_loss_history,
)
from citytools.training_data import (
    cache_random_views,
    check_dataset,
    collate,
    full_mode_transform,
    inference_transform,
    labels_of_split,
    load_splits,
)

logger = logging.getLogger("train_hf")


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
    calibrate: bool = field(
        default=True, metadata={"help": "Class models: after training, fit the temperature that makes the scores "
                                        "calibrated on the eval split (config.score_temperature; 0.5 means even odds) "
                                        "and write calibration.json (NLL and ECE before and after)."})
    calibrate_bias: bool = field(
        default=False, metadata={"help": "With --calibrate: fit a bias beside the temperature (Platt scaling), "
                                         "so that 0.5 is even odds for a model trained with unequal "
                                         "--label_loss_weights, which the temperature cannot move "
                                         "(config.score_bias). It flags more pictures at 0.5: docs/model.md."})
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
    native_fringes: bool = field(
        default=False,
        metadata={"help": "Give the head the picture's fringes measured over all of it at native resolution "
                          "(up to a 2048 px long side) by the processor (config.native_fringes, the processor's "
                          "fringe_values), beside every view's embedding. Full mode only (--train_backbone or "
                          "--vision_config). A CityClassifier without them gets them with zero weights."})
    native_patches: bool = field(
        default=False,
        metadata={"help": "Also give the head a learned stream at native resolution: a small CNN over the "
                          "picture's most edge-rich patches, unresized (config.native_patches, the processor's "
                          "fringe_patches). Implies --native_fringes; full mode only. A CityClassifier without it "
                          "gets it with zero head weights, so training starts from its exact scores."})
    native_size: bool = field(
        default=False,
        metadata={"help": "Also give the head how much evidence the native measurements rest on: the picture's "
                          "long side and the number of blocks measured (config.native_fringes' `size`), so that "
                          "it can lean on the enlarged views where a picture is small. Implies --native_fringes; "
                          "full mode only. A model without them gets them with zero weights. Stage 15's ablation "
                          "found no gain from them (docs/model.md)."})
    native_patch_count: Optional[int] = field(
        default=None,
        metadata={"help": "With --native_patches: patches per picture (default 32). The stream's work grows "
                          "with it (bench/bench_classify.py --native-streams --patch-count measures it untrained)."})
    native_patch_channels: Optional[int] = field(
        default=None,
        metadata={"help": "With --native_patches: the patch stream's width (default 16; 8 has a quarter of the "
                          "arithmetic in its two widest convolutions, but ran only a fifth faster on a CPU: "
                          "docs/speed.md)."})
    native_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "A model with native-resolution inputs: the share of training pictures whose native "
                          "inputs the head sees as zeros, so that the views alone must also tell a fringe "
                          "(config.native_dropout; training only, inference always reads them)."})
    distill_from: str | None = field(
        default=None,
        metadata={"help": "Comma-separated CityClassifier folders or Hub ids (teachers) whose combined score the "
                          "model also learns on every training view: knowledge distillation, e.g. of an ensemble "
                          "of the shipped model and a newer one into one model of the newer one's cost. Class "
                          "models, full mode; the teachers must read the inputs this model's processor makes."})
    distill_weights: str | None = field(
        default=None,
        metadata={"help": "With --distill_from: one weight per teacher on its calibrated log-probabilities "
                          "(the target is softmax(sum of weight x log p)); default equal shares summing to 1."})
    distill_loss_weight: float = field(
        default=1.0, metadata={"help": "With --distill_from: weight of the distillation loss beside the labels' loss."})


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


# -------------------------------------------------------------------------------------------- model


def build_model(model_args, label_ids, label_names):
    """(model, processor, train_backbone) from a CityClassifier, a CLIP, or a fresh --vision_config."""
    from transformers import PretrainedConfig

    num_labels = (max(label_ids) + 1) if model_args.arch == "class" else 1
    labels = {}
    if model_args.arch == "class":
        names = label_names or [str(i) for i in range(num_labels)]
        if len(names) != num_labels:
            raise UsageError(f"--class_names: {len(names)} names for {num_labels} labels (ids 0..{num_labels - 1})")
        labels["id2label"] = dict(enumerate(names))
        if model_args.label_loss_weights:
            labels["label_loss_weights"] = loss_weights(model_args.label_loss_weights, num_labels)
    head = {"arch": model_args.arch, "head_hidden_size": model_args.head_hidden_size,
            "tile_combine": model_args.tile_combine, "fringe_features": model_args.fringe_features or None, **labels}
    if model_args.vision_config:
        return with_native_fringes(*new_backbone(model_args, head), model_args)
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
        return with_native_fringes(*fine_tuned(model_args, num_labels, labels), model_args)
    try:
        model, processor = model_from_clip(model_args.model_name_or_path, tiling=model_args.arch == "class", **head)
    except ValueError as error:  # a head setting CityClassifierConfig refuses
        raise UsageError(f"{model_args.model_name_or_path}: {first_line(error)}") from None
    return with_native_fringes(model, processor, bool(model_args.train_backbone), model_args)


def patch_options(model_args):
    """--native_patch_count and --native_patch_channels as a `native_patches` spec (True: defaults)."""
    options = {name: value for name, value in (("count", model_args.native_patch_count),
                                               ("channels", model_args.native_patch_channels)) if value is not None}
    if options and not model_args.native_patches:
        raise UsageError("--native_patch_count and --native_patch_channels need --native_patches")
    try:
        native_patch_spec(options or True)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return options or True


def with_native_fringes(model, processor, train_backbone, model_args):
    """--native_fringes (--native_patches): the model reads the picture's native-resolution fringes (and
    patches: new head inputs with zero weights) and its processor makes them, with the same settings."""
    patches = patch_options(model_args)
    native = getattr(model.config, "native_fringes", None)
    if (model_args.native_fringes or model_args.native_patches or model_args.native_size or native) \
            and not train_backbone:
        flag = ("--native_patches" if model_args.native_patches else "--native_size" if model_args.native_size
                else "--native_fringes" if model_args.native_fringes
                else f"{model_args.model_name_or_path} reads native-resolution inputs: it")
        raise UsageError(f"{flag} needs full-mode training (--train_backbone, or --vision_config): "
                         "head-only training's cached embeddings carry no native-resolution inputs")
    existing = getattr(model.config, "native_patches", None)
    if existing and isinstance(patches, dict) and any(existing[name] != value for name, value in patches.items()):
        raise UsageError(f"{model_args.model_name_or_path} already has a patch stream {existing}: "
                         "--native_patch_count and --native_patch_channels cannot change it")
    if model_args.native_fringes or model_args.native_patches or model_args.native_size:
        model.add_native_fringes()
        if model_args.native_patches:
            model.add_native_patches(patches)
        if model_args.native_size:
            model.add_native_size()
    if model_args.native_dropout is not None:
        if not getattr(model.config, "native_fringes", None):
            raise UsageError("--native_dropout needs a model with native-resolution inputs (--native_fringes)")
        if not 0.0 <= model_args.native_dropout < 1.0:
            raise UsageError(f"--native_dropout must be in [0, 1), got {model_args.native_dropout}")
        model.config.native_dropout = model_args.native_dropout
    if getattr(model.config, "native_fringes", None):
        processor = processor.with_options(native_fringes=model.config.native_fringes,
                                           native_patches=getattr(model.config, "native_patches", None))
    return model, processor, train_backbone


def new_backbone(model_args, head):
    """(model, processor, train_backbone) for --vision_config (and --stem): a backbone from scratch."""
    from transformers import CLIPVisionConfig

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


def fine_tuned(model_args, num_labels, labels):
    """(model, processor, train_backbone) for a CityClassifier to fine-tune: its own head settings kept."""
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


def loss_weights(text, num_labels):
    """--label_loss_weights "1.0,0.5" -> [1.0, 0.5]: one positive number per label, or a UsageError."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != num_labels or not all(w > 0 and np.isfinite(w) for w in weights):
        raise UsageError(f"--label_loss_weights {text}: {num_labels} positive numbers needed, one per label")
    return weights


# -------------------------------------------------------------------------------------------- train


# Processor settings that make pixel_values, fringe_values and fringe_patches: a teacher must share them.
INPUT_SETTINGS = ("tiling", "size", "crop_size", "resample", "rescale_factor", "image_mean", "image_std")


def load_teachers(model_args, model, processor, train_backbone):
    """--distill_from: (teachers, weights), the teachers frozen, each checked to read the inputs that
    `processor` makes for `model`; ([], []) without it."""
    if not model_args.distill_from:
        if model_args.distill_weights:
            raise UsageError("--distill_weights needs --distill_from")
        return [], []
    if model_args.arch != "class" or not train_backbone:
        raise UsageError("--distill_from: class models in full mode only (--train_backbone, or --vision_config): "
                         "head-only training's cached embeddings are the student's, not the teachers'")
    names = [name.strip() for name in model_args.distill_from.split(",") if name.strip()]
    weights = ([1.0 / len(names)] * len(names) if not model_args.distill_weights else
               [float(w) for w in model_args.distill_weights.split(",")])
    if len(weights) != len(names) or not all(np.isfinite(w) for w in weights):
        raise UsageError(f"--distill_weights {model_args.distill_weights}: one number per teacher ({len(names)})")
    teachers = []
    for name in names:
        try:
            teacher = CityClassifierForImageClassification.from_pretrained(name)
            teacher_processor = CityClassifierImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as error:  # not a CityClassifier, or not all its weights
            raise UsageError(f"--distill_from {name}: cannot load the model ({first_line(error)})") from None
        if teacher.config.arch != "class" or teacher.config.num_labels != model.config.num_labels:
            raise UsageError(f"--distill_from {name}: a {teacher.config.arch} model with "
                             f"{teacher.config.num_labels} labels cannot teach a class model with "
                             f"{model.config.num_labels}")
        differ = [setting for setting in INPUT_SETTINGS
                  if getattr(teacher_processor, setting) != getattr(processor, setting)]
        for setting in ("native_fringes", "native_patches"):  # what a teacher reads must be what is made
            wanted = getattr(teacher.config, setting, None)
            if wanted and wanted != getattr(model.config, setting, None):
                differ.append(setting)
        if differ:
            raise UsageError(f"--distill_from {name}: reads other inputs than the model being trained "
                             f"({', '.join(differ)} differ)")
        teachers.append(teacher)
    logger.info("distilling from %s, weights %s", ", ".join(names), ", ".join(f"{w:g}" for w in weights))
    return teachers, weights


def check_before_work(model_args, training_args):
    """What can be refused before any data is read: the arch, an output that is a file, the Hub token."""
    if model_args.arch not in ("class", "score"):
        raise UsageError(f"--arch must be class or score, got {model_args.arch!r}")
    if Path(training_args.output_dir).exists() and not Path(training_args.output_dir).is_dir():
        raise UsageError(f"--output_dir {training_args.output_dir}: is a file, not a folder")
    if training_args.push_to_hub:
        check_hub("--push_to_hub", training_args.hub_token)  # before any data is read or embedded


def calibrate(trainer, data_args):
    """--calibrate: the trained model's score_temperature (and score_bias) fitted on the eval split -> fit_temperature's
    report, or None when switched off."""
    if not data_args.calibrate:
        return None
    calibration = fit_temperature(trainer.model, trainer.get_eval_dataloader(), bias=data_args.calibrate_bias)
    trainer.model.config.score_temperature = calibration["temperature"]
    trainer.model.config.score_bias = calibration["bias"]  # None without --calibrate_bias: an old one goes
    logger.info("calibrated on %d %s images: temperature %.3f%s, ECE %.4f -> %.4f", calibration["images"],
                data_args.eval_split, calibration["temperature"],
                f", bias {calibration['bias']}" if calibration["bias"] else "", calibration["ece_at_1"],
                calibration["ece"])
    return calibration


def main(argv=None):
    from transformers import set_seed

    data_args, model_args, training_args = parse_args(argv)
    if data_args.calibrate_bias and not data_args.calibrate:
        raise UsageError("--calibrate_bias fits a bias with the temperature: it needs --calibrate")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    check_before_work(model_args, training_args)
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

    teachers, weights = load_teachers(model_args, model, processor, train_backbone)
    distilling = {"teachers": teachers, "teacher_weights": weights,
                  "distill_loss_weight": model_args.distill_loss_weight} if teachers else {}
    trainer = (DistillingTrainer if teachers else Trainer if train_backbone else HeadOnlyTrainer)(
        **distilling,
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
    calibration = calibrate(trainer, data_args) if eval_ds is not None and model_args.arch == "class" else None
    trainer.save_model(str(output))  # the model and its processor
    if calibration is not None:
        (output / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    write_loss_history(trainer.state.log_history, output)  # a resumed run's state holds the earlier steps too
    if eval_ds is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    if data_args.top_loss_images and model_args.arch == "class":
        list_highest_loss(trainer.model, splits[data_args.train_split], train_ds, train_backbone, processor,
                          train_labels, data_args, training_args, output)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return EXIT_SOME_FAILED if left_out else EXIT_OK
