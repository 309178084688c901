#!/usr/bin/env python
"""classify.py's batching against a GPU, simulated on any machine: the real decoding workers and
loader (`citytools.loading.loader_batches` over a `FileStream`) feed a device modelled as a clock, which runs
`--rate` crops/s asynchronously, as a GPU does, with classify.py's host loop around it (batch n is
queued, then the host waits for batch n - 1). Two ways of batching:
- whole: every batch `--batch-size` images (fewer at the end), as before `idle`, joined from the
  workers' small batches (`citytools.loading.micro_batch`) as on a GPU;
- idle: while the device has nothing queued, the images decoded so far go as soon as they are a
  quarter of a batch (`loader_batches`' `idle`, what classify.py does on a GPU).
It prints and writes JSON: seconds end to end, the device's busy share, the batches, when the first
started and how long the device ran alone after the decoding ended. The data path alone (no
device) is measured first; the device's rate is by default 1.25 times that, as on an H100, whose
raw ViT-L ran 927 crops/s where its 15 workers fed 744 (bench/gpu-h100-run4.json).

What it leaves out: the model's own first calls (warm-up), the GPU's real speed at each batch size,
the host's time to queue a batch. A model of the batching only; bench_gpu.py measures the GPU.

  python bench/simulate_gpu_batching.py --images 200 --out bench/simulated-batching.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from gpu_measures import count_crops, make_data  # noqa: E402

from citytools.loading import FileStream, loader_batches  # noqa: E402
from citytools.scorer import Scorer  # noqa: E402
from citytools.toolkit import MAX_PIXELS  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def model_folder(folder):
    """A tiny random CityClassifier with ViT-L/14-336's preprocessing (336 px views, tiled above 672):
    the data path is the real one; the model never runs."""
    from bench_head_steps import TINY
    from transformers import CLIPVisionConfig

    from citytools.remote import (
        CityClassifierConfig,
        CityClassifierForImageClassification,
        CityClassifierImageProcessor,
    )

    torch.manual_seed(0)
    CityClassifierForImageClassification(CityClassifierConfig(vision_config=CLIPVisionConfig(**TINY))).save_pretrained(
        folder)
    CityClassifierImageProcessor().save_pretrained(folder)
    return folder


def run(scorer, data, batch_size, workers, rate, mode):
    """One pass over `data`: {"seconds", "device_busy", "batches", "first_batch_starts_s",
    "device_alone_at_end_s"}; `mode` None: the data path alone (no device)."""
    stream = FileStream([str(data)], scorer, np.array([], dtype=np.int64), 0, 1, MAX_PIXELS)
    clock = time.perf_counter
    start = clock()
    busy_until, busy, batches, first, last_arrival = start, 0.0, 0, None, start
    # "whole": never idle, so the workers' small batches are joined up to whole ones, as on a GPU
    idle = {"idle": lambda: clock() >= busy_until, "whole": lambda: False}.get(mode)
    for _, grouped in loader_batches(stream, batch_size, workers, torch.device("cpu"), idle=idle):
        last_arrival = now = clock()
        crops = int(grouped[0][1].sum()) if grouped else 0
        if mode is None or not crops:
            continue
        previous_end = busy_until
        begin = max(now, busy_until)  # queued behind what the device still runs
        busy_until = begin + crops / rate
        busy += crops / rate
        batches += 1
        first = begin - start if first is None else first
        time.sleep(max(0.0, previous_end - clock()))  # classify.py: batch n - 1's rows, once n is queued
    end = max(clock(), busy_until)  # the device's last batch done
    return {"seconds": end - start, "device_busy": busy / (end - start) if mode else None, "batches": batches,
            "first_batch_starts_s": first, "device_alone_at_end_s": max(0.0, busy_until - last_arrival)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="synthetic images of 256-2048 px (default: 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="images a whole batch (default: 64, a GPU's)")
    parser.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 1) - 1),
                        help="decoding workers (default: cores - 1, at least 2: with 1 there is nothing to hand over "
                             "early)")
    parser.add_argument("--rate", type=float, default=None,
                        help="the device's crops/s (default: 1.25x the data path's, measured first)")
    parser.add_argument("--repeat", type=int, default=2, help="passes of each kind; the best is kept (default: 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "simulated-batching.json", help="JSON to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_data(tmp / "data", args.images, dry_run=False)
        scorer = Scorer([str(model_folder(tmp / "model"))], device="cpu", dtype="float32")
        crops = count_crops(files, scorer.processors[0])
        report = {"cpu": cpu_name(), "cores": os.cpu_count(), "images": len(files), "crops": crops,
                  "batch_size": args.batch_size, "workers": args.workers}

        def best(mode, rate):
            runs = [run(scorer, tmp / "data" / "train", args.batch_size, args.workers, rate, mode)
                    for _ in range(args.repeat)]
            return min(runs, key=lambda r: r["seconds"])

        alone = best(None, None)
        report["data_path"] = {**alone, "crops_per_s": crops / alone["seconds"]}
        rate = args.rate or 1.25 * report["data_path"]["crops_per_s"]
        report["device_crops_per_s"] = rate
        report["device_alone_s"] = crops / rate  # the device's own work, were it never kept waiting
        for mode in ("whole", "idle"):
            report[mode] = best(mode, rate)
            report[mode]["ratio_to_device"] = report["device_alone_s"] / report[mode]["seconds"]
            print(f"{mode}: {json.dumps(report[mode])}", file=sys.stderr, flush=True)
        report["idle_vs_whole_seconds"] = report["idle"]["seconds"] / report["whole"]["seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
