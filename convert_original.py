#!/usr/bin/env python
"""Converts a released CityClassifiers head (STEM.safetensors + STEM.config.json) and a CLIP vision
model into a self-contained transformers model folder that loads with trust_remote_code=True."""

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from remote_code import (
    CityClassifierConfig,
    CityClassifierForImageClassification,
    CityClassifierImageProcessor,
)
from toolkit import UsageError, atomic_output_dir, run_cli

# Loss weights of the released models (ORIGINAL.md); the release configs do not carry them.
RELEASED_LOSS_WEIGHTS = {
    "CCAnime-ChromaticAberration": [1.0, 0.5],
    "CCAnime-Compression": [1.0, 0.85, 0.65],
}
HEAD_LAYERS = ("up.0", "up.1.long.0", "up.1.long.2", "up.1.long.4", "down.0", "down.1", "down.4", "down.5")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: python convert_original.py --head CCAnime-ChromaticAberration-v1.16.safetensors "
        "--clip openai/clip-vit-large-patch14-336 --out models/ca-v1.16",
    )
    parser.add_argument("--head", required=True, type=Path, help="the released head weights, STEM.safetensors")
    parser.add_argument(
        "--config",
        type=Path,
        help="the released STEM.config.json; default: beside --head if present, else labels are named by index",
    )
    parser.add_argument(
        "--clip", required=True, help="CLIP model folder or Hub id (the original: openai/clip-vit-large-patch14-336)"
    )
    parser.add_argument("--out", required=True, type=Path, help="model folder to write")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def read_head(path):
    """The head's state dict, checked against the original's layer names and shapes."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{path}: not a safetensors file ({error})") from None
    expected = {f"{layer}.{kind}" for layer in HEAD_LAYERS for kind in ("weight", "bias")}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UsageError(
            f"{path}: not a CityClassifiers head (missing keys: {missing[:4] or 'none'}, "
            f"unexpected keys: {unexpected[:4] or 'none'})"
        )
    return {key: value.float() for key, value in state.items()}


def read_release_config(path, head_path, outputs):
    """Name, revision, arch and labels from STEM.config.json, or the original's fallbacks without one."""
    if path is None:
        sibling = head_path.with_name(head_path.name.removesuffix(".safetensors") + ".config.json")
        path = sibling if sibling.is_file() else None
    if path is None:
        arch = "score" if outputs == 1 else "class"
        return {"name": head_path.stem, "rev": None, "arch": arch, "labels": {str(i): str(i) for i in range(outputs)}}
    try:
        release = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot read the release config ({error})") from None
    declared = release.get("model_params", {}).get("outputs", outputs)
    if declared != outputs:
        raise UsageError(f"{path}: says outputs={declared} but the head has {outputs}")
    if release.get("arch", "class") == "class":
        release.setdefault("labels", {str(i): str(i) for i in range(outputs)})
    return release


def convert(args):
    head = read_head(args.head)
    hidden, features = head["up.0.weight"].shape
    outputs = head["down.5.bias"].shape[0]
    release = read_release_config(args.config, args.head, outputs)
    arch = release.get("arch", "class")

    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        clip = CLIPVisionModelWithProjection.from_pretrained(args.clip, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise UsageError(f"{args.clip}: cannot load a CLIP vision model ({str(error).splitlines()[0]})") from None
    if clip.config.projection_dim != features:
        raise UsageError(
            f"{args.head}: head takes {features}-d embeddings but {args.clip} projects to "
            f"{clip.config.projection_dim}-d"
        )
    try:
        clip_processor = CLIPImageProcessor.from_pretrained(args.clip)
        size, crop_size = clip_processor.size, clip_processor.crop_size
        mean, std = clip_processor.image_mean, clip_processor.image_std
    except OSError:  # a bare vision checkpoint: CLIP's standard preprocessing at the model's resolution
        size = {"shortest_edge": clip.config.image_size}
        crop_size = {"height": clip.config.image_size, "width": clip.config.image_size}
        mean = std = None

    name = release.get("name", args.head.stem)
    label_kwargs = {}
    if arch == "class":
        label_kwargs["id2label"] = {int(i): label for i, label in release["labels"].items()}
        label_kwargs["label_loss_weights"] = RELEASED_LOSS_WEIGHTS.get(name)
    config = CityClassifierConfig(
        vision_config=clip.config.to_dict(),
        arch=arch,
        head_hidden_size=hidden,
        original_name=name,
        original_rev=release.get("rev"),
        **label_kwargs,
    )
    model = CityClassifierForImageClassification(config)
    model.clip.load_state_dict(clip.state_dict())
    model.head.load_state_dict(head)
    model.to(getattr(torch, args.dtype)).eval()
    processor = CityClassifierImageProcessor(
        tiling=arch == "class", size=dict(size), crop_size=dict(crop_size), image_mean=mean, image_std=std
    )

    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(config, args))
    print(f"wrote {args.out}: {arch} model {name} {release.get('rev') or ''}, labels {config.id2label}")
    return 0


def model_card(config, args):
    """A short Hub model card for a converted release."""
    labels = "\n".join(f"| {i} | {name} |" for i, name in config.id2label.items())
    title = f"{config.original_name} {config.original_rev or ''}".strip()
    return f"""---
library_name: transformers
pipeline_tag: image-classification
license: mit
tags:
- cityclassifier
- anime
---

# {title}

city96's CityClassifiers model `{title}` as a transformers model (`trust_remote_code=True`).
Converted with `convert_original.py` from head `{args.head.name}` and CLIP backbone `{args.clip}`;
its scores equal the original code's (tiling and `{config.tile_combine}` combination included).

| id | label |
| --- | --- |
{labels}

```python
from transformers import pipeline
pipe = pipeline("image-classification", model="PATH_OR_REPO", trust_remote_code=True)
pipe("image.png", top_k=None)
```
"""


def main(argv=None):
    return convert(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
