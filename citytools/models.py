"""Loading models for scoring: a folder or Hub id, safetensors only, every weight present, with the
fingerprints that identify what scored a row."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor
from citytools.toolkit import ROOT, first_line


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
