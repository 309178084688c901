"""train_hf.py's data: splits of a `datasets` image folder or Hub dataset, labels from folder names,
every image decoded once before training (the unreadable ones left out, one line each), and the
views each step trains on."""

import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from citytools.toolkit import UsageError, first_line, label_from_folder, labels_from_folders, load_dataset

IMAGE, LABEL = "image", "label"  # the columns are renamed to these on loading


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
            native = {name: [np.frombuffer(raw, dtype=dtype).reshape(shape) for raw in batch[name]]
                      for name, (dtype, shape) in processor.native_layout().items()}
        else:
            images = [decode(image) for image in batch[IMAGE]]
            views = [random_view(processor, image, rng) for image in images]
            measured = [processor.native_inputs(image) for image in images]
            native = {name: [m[name] for m in measured] for name in processor.native_layout()}
        pixels = processor.normalize_views(views)[:, None]  # (batch, 1, 3, S, S)
        out = {"pixel_values": torch.from_numpy(pixels), "tile_mask": torch.ones(len(views), 1, dtype=torch.long),
               "labels": labels_of(batch)}
        if "fringe_patches" in native:  # flipped and turned at random: a fringe's geometry has no favourite side
            native["fringe_patches"] = [random_turn(patches, rng) for patches in native["fringe_patches"]]
        for name, values in native.items():  # the whole picture's, whichever view of it is trained on
            out[name] = torch.from_numpy(np.stack(values))
        return out

    return transform


def random_turn(patches, rng):
    """(count, 3, S, S) patches flipped across each axis and transposed, each at even odds."""
    if rng.random() < 0.5:
        patches = patches[..., ::-1]
    if rng.random() < 0.5:
        patches = patches[..., ::-1, :]
    if rng.random() < 0.5:
        patches = patches.swapaxes(-1, -2)
    return np.ascontiguousarray(patches)


def inference_transform(processor, labels_of, embedded):
    """All views of each image, combined in the model, as at inference (evaluation, loss listing)."""
    if embedded:
        return lambda batch: {"image_embeds": torch.tensor(np.asarray(batch["image_embeds"], dtype=np.float32)),
                              "tile_mask": torch.tensor(np.asarray(batch["tile_mask"])),
                              "labels": labels_of(batch)}
    return lambda batch: {**processor([decode(image) for image in batch[IMAGE]], return_tensors="pt"),
                          "labels": labels_of(batch)}


def cache_random_views(ds, processor, data_args, seed):
    """Decodes each training image once and keeps `cache_views` random views of it (S x S x 3 uint8
    bytes), each with the picture's native inputs (raw bytes, `processor.native_layout()`) when the
    processor makes them."""
    layout = processor.native_layout()

    def crops(batch, indices):
        out = {"view": [], LABEL: [], **{name: [] for name in layout}}
        for image, label, index in zip(batch[IMAGE], batch[LABEL], indices):
            rng = np.random.default_rng([seed, index])
            decoded = decode(image)
            native = processor.native_inputs(decoded)
            for _ in range(data_args.cache_views):
                out["view"].append(np.ascontiguousarray(random_view(processor, decoded, rng)).tobytes())
                out[LABEL].append(label)
                for name, (dtype, _) in layout.items():
                    out[name].append(native[name].astype(dtype).tobytes())
        return out

    return ds.map(crops, batched=True, batch_size=16, with_indices=True, remove_columns=ds.column_names,
                  num_proc=min(2, os.cpu_count() or 1), desc=f"Caching {data_args.cache_views} random views per image",
                  new_fingerprint=views_cache_fingerprint(ds, processor, data_args.cache_views, seed))


def views_cache_fingerprint(ds, processor, cache_views, seed):
    """The key of `cache_random_views`' cache: the dataset, the processor's settings, the views and
    seed, and the source of this module and of every loaded module of the processor's package (the
    processor, its tiling, the native measurement). datasets' own key hashes the mapped function and
    its closure but not the code it calls, so a changed measurement would otherwise be served the
    views and measurements cached before the change."""
    name = type(processor).__module__
    package = name.rpartition(".")[0]
    names = sorted(n for n in list(sys.modules) if n == name or (package and n.startswith(package + ".")))
    sources = [inspect.getsource(sys.modules[n]) for n in [__name__, *names]]
    key = json.dumps([ds._fingerprint, processor.to_json_string(), cache_views, seed, sources])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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
