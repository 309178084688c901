"""Loading models for scoring: a folder or Hub id, safetensors only, every weight present, with the
fingerprints that identify what scored a row."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from citytools.cards import hub_id
from citytools.remote import CityClassifierConfig, CityClassifierForImageClassification, CityClassifierImageProcessor
from citytools.toolkit import ROOT, UsageError, first_line


@dataclass
class ScoringModel:
    key: str
    model: CityClassifierForImageClassification
    processor: CityClassifierImageProcessor
    tiling: bool  # this run's options, passed per call: the loaded config and processor stay as saved
    combine: str
    weights: str  # fingerprint of the checkpoint files


def model_key(name):
    """A short column prefix: the folder name ("default" for the shipped model), or the Hub repo name."""
    folder = Path(name).resolve()
    if folder.is_dir():
        return "default" if folder == ROOT else folder.name
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


def model_from_clip(clip_name, tiling, dtype=torch.float32, **config):
    """(model, processor): a CityClassifier whose CLIP tower holds `clip_name`'s weights (a folder or a
    Hub id) under a new head built from `config`, and CLIP's preprocessing (its image processor's
    sizes, mean and std; without one, CLIP's standard at the model's resolution). The config names
    the CLIP only by Hub id, never by a path on this machine. train_hf.py builds its models here too."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        clip = CLIPVisionModelWithProjection.from_pretrained(clip_name, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UsageError(f"{clip_name}: cannot load a CLIP vision model ({first_line(error)})") from None
    vision = {**clip.config.to_dict(), "_name_or_path": hub_id(clip_name) or ""}
    model = CityClassifierForImageClassification(CityClassifierConfig(vision_config=vision, **config))
    model.clip.load_state_dict(clip.state_dict())
    try:
        clip_processor = CLIPImageProcessor.from_pretrained(clip_name)
        sizes = {"size": dict(clip_processor.size), "crop_size": dict(clip_processor.crop_size),
                 "image_mean": clip_processor.image_mean, "image_std": clip_processor.image_std}
    except OSError:  # a bare vision checkpoint
        side = clip.config.image_size
        sizes = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    return model, CityClassifierImageProcessor(tiling=tiling, **sizes)
