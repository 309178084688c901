#!/usr/bin/env python
"""Issue #27's ablation of the native-resolution streams, outside the CLIP model: each stream
trained alone on a dataset's train split, scored on its test split by family and delivery, beside
the classical yardstick (the measurement's `fringe_px`) and, with --model, a CityClassifier's scores
and the model stacked with each stream (a logistic regression fitted on the validation split).

  streams: "measurements" (the 13 native fringe measurements, an MLP), "patches" (the processor's
  fringe_patches through the model's CityClassifierPatchStream, then the same MLP), "both".

The inputs are what the processor makes (`measure_native`, defaults), computed once per picture in
parallel processes; the patch stream is the model's own module. Writes DIR/ablation.json, e.g.:

  python bench/stream_ablation.py --dataset data/real-seed6 --model runs/default_model_stage6 \\
      --out bench/stream-ablation
"""

import argparse
import csv
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_classify import machine  # noqa: E402  (this folder is on the path: the script's own)

from citytools.remote import (  # noqa: E402
    NATIVE_FRINGE_FEATURES,
    CityClassifierPatchStream,
    measure_native,
    native_patch_spec,
)

STREAMS = ("measurements", "patches", "both")
PATCHES = native_patch_spec(True)


def native_of(path):
    with Image.open(path) as image:
        image.load()
        return measure_native(image, None, PATCHES)


def load_split(root, split, processes):
    """The split's rows (metadata.csv) and every picture's (measurements, patches), in order."""
    rows = list(csv.DictReader(open(Path(root, split, "metadata.csv"), newline="")))
    with Pool(processes) as pool:
        native = pool.map(native_of, [str(Path(root, split, r["file_name"])) for r in rows], chunksize=16)
    return {"rows": rows, "values": np.stack([v for v, _ in native]), "patches": np.stack([p for _, p in native]),
            "label": np.array([int(r["label"]) for r in rows])}


class StreamModel(nn.Module):
    """One or both streams, then a small MLP to one logit."""

    def __init__(self, stream, mean, std):
        super().__init__()
        self.stream = stream
        self.patches = CityClassifierPatchStream(PATCHES) if stream != "measurements" else None
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        width = (CityClassifierPatchStream.features(PATCHES) if self.patches is not None else 0) + (
            len(NATIVE_FRINGE_FEATURES) if stream != "patches" else 0)
        self.head = nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 1))

    def forward(self, values, patches):
        parts = [self.patches(patches)] if self.patches is not None else []
        if self.stream != "patches":
            parts.append((values.clamp_min(0).log1p() - self.mean) / self.std)
        return self.head(torch.cat(parts, 1)).squeeze(1)


def turn(patches):
    """The batch's patches flipped and transposed at random (as train_hf's transform does per picture)."""
    if torch.rand(()) < 0.5:
        patches = patches.flip(-1)
    if torch.rand(()) < 0.5:
        patches = patches.flip(-2)
    return patches.transpose(-1, -2) if torch.rand(()) < 0.5 else patches


def train(stream, data, epochs, batch, lr):
    logs = np.log1p(np.clip(data["values"], 0, None))
    model = StreamModel(stream, logs.mean(0), logs.std(0) + 1e-6)
    values, patches = torch.from_numpy(data["values"]), torch.from_numpy(data["patches"])
    labels = torch.from_numpy(data["label"]).float()
    steps = epochs * (len(labels) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        model.train()
        order, started, total = torch.randperm(len(labels)), time.time(), 0.0
        for start in range(0, len(labels) - batch + 1, batch):
            index = order[start : start + batch]
            loss = nn.functional.binary_cross_entropy_with_logits(model(values[index], turn(patches[index])),
                                                                  labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        print(f"{stream}: epoch {epoch + 1}/{epochs}, loss {total / (len(labels) // batch):.4f}, "
              f"{time.time() - started:.0f} s", file=sys.stderr)
    return model


@torch.no_grad()
def logits(model, data):
    model.eval()
    values, patches = torch.from_numpy(data["values"]), torch.from_numpy(data["patches"])
    return torch.cat([model(values[i : i + 128], patches[i : i + 128]) for i in range(0, len(values), 128)]).numpy()


def model_logits(scorer, root, split, rows):
    """The scorer's model's log-odds of its last label on each of the split's `rows` (classify.py's engine)."""
    from citytools.loading import collate, load_image

    out = []
    for start in range(0, len(rows), 16):
        items = [(None, scorer.preprocess(load_image(str(Path(root, split, r["file_name"])))))
                 for r in rows[start : start + 16]]
        out += [output.scores[:, -1] for _, output, _ in scorer.outputs(collate(items)[1])]
    p = np.clip(torch.cat(out).numpy().astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def by_group(data, scores):
    from sklearn.metrics import roc_auc_score

    result = {"all": roc_auc_score(data["label"], scores)}
    for column in ("family", "delivery"):
        groups = np.array([r.get(column, "") for r in data["rows"]])
        for group in sorted(set(groups)):
            chosen = groups == group
            if 0 < data["label"][chosen].sum() < chosen.sum():
                result[f"{column}: {group}"] = roc_auc_score(data["label"][chosen], scores[chosen])
    return {k: round(float(v), 4) for k, v in result.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="an image folder with train, validation and test splits")
    parser.add_argument("--model", help="a CityClassifier folder to score and stack with each stream")
    parser.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, of {', '.join(STREAMS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", required=True, help="folder for ablation.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    splits = {s: load_split(args.dataset, s, args.processes) for s in ("train", "validation", "test")}
    report = {"dataset": args.dataset, "test pictures": len(splits["test"]["label"]), "epochs": args.epochs,
              "machine": machine(), "patches": PATCHES, "roc_auc": {},
              "yardstick (fringe_px)": by_group(splits["test"], splits["test"]["values"][:, 0])}
    model = None
    if args.model:
        from citytools.scorer import Scorer

        scorer = Scorer([args.model])
        model = {s: model_logits(scorer, args.dataset, s, splits[s]["rows"]) for s in ("validation", "test")}
    if model:
        report["roc_auc"][f"model {args.model}"] = by_group(splits["test"], model["test"])
    for stream in args.streams.split(","):
        started = time.time()
        trained = train(stream, splits["train"], args.epochs, args.batch, args.lr)
        test = logits(trained, splits["test"])
        report["roc_auc"][stream] = by_group(splits["test"], test)
        report.setdefault("train seconds", {})[stream] = round(time.time() - started)
        if model:
            from sklearn.linear_model import LogisticRegression

            validation = logits(trained, splits["validation"])
            stack = LogisticRegression().fit(np.stack([validation, model["validation"]], 1),
                                             splits["validation"]["label"])
            stacked = stack.decision_function(np.stack([test, model["test"]], 1))
            report["roc_auc"][f"model + {stream} (stacked)"] = by_group(splits["test"], stacked)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, figures in [("yardstick", report["yardstick (fringe_px)"]), *report["roc_auc"].items()]:
        print(f"{name}: all {figures['all']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
