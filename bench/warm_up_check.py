#!/usr/bin/env python
"""classify.py's fixed cost with and without its GPU warm-up, on bench_gpu.py's data and random ViT-L
(one GPU call, about 3 minutes on an H200 machine; --dry-run: tiny, on a CPU, where no warm-up runs).

Variants are copies of this checkout with citytools/cli/classify.py edited: "off" (no warm-up), "one"
(one blank image instead of four); "current" is the checkout as it is. Each runs once on the 600 images
and once on them three times over (hard links), in that order. Writes $OUT/warm.json (default
/tmp/warm-out). bench/gpu-h200-run6-warmup.json is one run's output.

  python bench/warm_up_check.py            # on a CUDA machine
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from gpu_measures import classify_run, make_data, random_model, repeated_folder  # noqa: E402

EDITS = {  # variant -> (text in citytools/cli/classify.py, replacement)
    "off": ('        if on_gpu:\n            with stopwatch("warm_up"):',
            '        if False:\n            with stopwatch("warm_up"):'),
    "one": ("                scorer.warm_up()", "                scorer.warm_up(1)"),
}


def variant(tmp, name):
    """A copy of the checkout with EDITS[name] made (the edit must still match the code)."""
    copy = tmp / name
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".whl", ".baseline", ".devmodels", ".venv",
                                                              "data", "runs", "bench"))
    path = copy / "citytools" / "cli" / "classify.py"
    old, new = EDITS[name]
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"error: {path.relative_to(copy)} no longer holds the line variant {name!r} edits")
    path.write_text(text.replace(old, new))
    return copy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="12 small images on the CPU: checks the paths only")
    dry = parser.parse_args().dry_run
    out = Path(os.environ.get("OUT", "/tmp/warm-out"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    tmp = Path(tempfile.mkdtemp())
    roots = {"current": ROOT, **{name: variant(tmp, name) for name in EDITS}}
    start = time.time()
    files = make_data(tmp / "data", 12 if dry else 600, dry)
    model = random_model(tmp / "vit-l", dry)
    print(f"data and model: {time.time() - start:.1f}s", flush=True)
    folders = {1: tmp / "data" / "train", 3: repeated_folder(files, tmp / "x3", 3)}
    report = {"images": len(files)}
    for name, root in roots.items():
        for copies, folder in folders.items():
            seconds, busy, phases = classify_run(folder, model, tmp / "scores.jsonl", device, (), root)
            key = f"{name}_x{copies}_round0"
            report[key] = {"seconds": seconds, "images_per_s": copies * len(files) / seconds, "busy": busy,
                           "time": phases}
            print(key, json.dumps(report[key]), flush=True)
            (out / "warm.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
