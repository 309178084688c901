"""Converts a released CityClassifiers head (STEM.safetensors + STEM.config.json) and a CLIP vision
model into a self-contained transformers model folder that loads with trust_remote_code=True."""

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from citytools.cards import card_text, hub_id
from citytools.models import model_from_clip
from citytools.toolkit import DTYPES, UsageError, atomic_output_dir, check_output_dir, first_line

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
    parser.add_argument("--dtype", choices=[d for d in DTYPES if d != "auto"], default="float32", help="weight dtype")
    parser.add_argument("--repo-id", help="the Hub id the model card's usage snippet names (default: --out's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a model folder this tool "
                        "wrote (nothing else in it, and not one of the inputs)")
    return parser.parse_args(argv)


def read_head(path):
    """The head's state dict, checked against the original's layer names and shapes: one line naming
    the first weight that does not fit."""
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
    hidden, features = state["up.0.weight"].shape if state["up.0.weight"].ndim == 2 else (0, 0)
    outputs = state["down.5.weight"].shape[0] if state["down.5.weight"].ndim == 2 else 0
    sizes = (features, hidden, hidden, hidden, hidden, 128, 64, 32, outputs)  # layer i: sizes[i] -> sizes[i + 1]
    for i, layer in enumerate(HEAD_LAYERS):
        want = {"weight": (sizes[i + 1], sizes[i]), "bias": (sizes[i + 1],)}
        for kind, shape in want.items():
            got = tuple(state[f"{layer}.{kind}"].shape)
            if got != shape or min(shape) < 1:
                raise UsageError(f"{path}: {layer}.{kind} has shape {list(got)}, the original's head needs "
                                 f"{list(shape)} there")
    return {key: value.float() for key, value in state.items()}


def read_release_config(path, head_path, outputs):
    """Name, revision, arch and labels from STEM.config.json, or the original's fallbacks without one;
    a config that does not fit the head is one line naming what does not fit."""
    if path is None:
        sibling = head_path.with_name(head_path.name.removesuffix(".safetensors") + ".config.json")
        path = sibling if sibling.is_file() else None
    if path is None:
        arch = "score" if outputs == 1 else "class"
        return {"name": head_path.stem, "rev": None, "arch": arch, "labels": {str(i): str(i) for i in range(outputs)}}
    try:
        release = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot read the release config ({first_line(error)})") from None
    if not isinstance(release, dict):
        raise UsageError(f"{path}: not a release config (a JSON object with name, arch, labels)")
    params = release.get("model_params", {})
    declared = params.get("outputs", outputs) if isinstance(params, dict) else outputs
    if declared != outputs:
        raise UsageError(f"{path}: says outputs={declared} but the head has {outputs}")
    arch = release.setdefault("arch", "class")
    if arch not in ("class", "score"):
        raise UsageError(f"{path}: arch {arch!r} is neither class nor score")
    if arch == "score" and outputs != 1:
        raise UsageError(f"{path}: arch is score, which needs a head with 1 output; this one has {outputs}")
    if arch == "class":
        labels = release.setdefault("labels", {str(i): str(i) for i in range(outputs)})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise UsageError(f"{path}: labels must be an object of id -> name, like {{\"0\": \"Pass\"}}")
        if sorted(labels) != sorted(str(i) for i in range(outputs)):
            raise UsageError(f"{path}: labels name ids {', '.join(sorted(labels)) or 'none'}; the head has "
                             f"{outputs} outputs, ids 0..{outputs - 1}")
    return release


def convert(args):
    check_output_dir(args.out, args.overwrite, inputs=(args.head, args.clip))  # before the CLIP loads
    head = read_head(args.head)
    hidden, features = head["up.0.weight"].shape
    outputs = head["down.5.bias"].shape[0]
    release = read_release_config(args.config, args.head, outputs)
    arch = release.get("arch", "class")
    name = release.get("name", args.head.stem)
    labels = {}
    if arch == "class":
        labels["id2label"] = {int(i): label for i, label in release["labels"].items()}
        labels["label_loss_weights"] = RELEASED_LOSS_WEIGHTS.get(name)
    model, processor = model_from_clip(args.clip, tiling=arch == "class", arch=arch, head_hidden_size=hidden,
                                       original_name=name, original_rev=release.get("rev"), **labels)
    projection = model.config.vision_config.projection_dim
    if projection != features:
        raise UsageError(f"{args.head}: head takes {features}-d embeddings but {args.clip} projects to {projection}-d")
    model.head.load_state_dict(head)
    model.to(getattr(torch, args.dtype)).eval()
    model.config.vision_config.dtype = args.dtype  # save_pretrained records the top config's dtype only

    repo_id = args.repo_id or args.out.name
    source = f"Backbone: `{hub_id(args.clip) or 'a local CLIP folder'}`; head: `{args.head.name}`."
    with atomic_output_dir(args.out, args.overwrite, inputs=(args.head, args.clip)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card_text(model.config.to_dict(), repo_id, source=source))
    print(f"wrote {args.out}: {arch} model {name} {release.get('rev') or ''}, labels {model.config.id2label}")
    return 0


def main(argv=None):
    return convert(parse_args(argv))
