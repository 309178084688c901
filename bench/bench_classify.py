#!/usr/bin/env python
"""Throughput and memory of classify.py against the original folder script's loop, in one run.

The baseline reproduces the original: one image at a time, opened and converted to RGB, through
the processor, then the model, in float32. classify.py runs with its defaults (batched, parallel
decoding, bf16 where the CPU has it). Both score the same images with the same model; each runs in
its own subprocess, so peak RSS (ru_maxrss, largest process) is comparable. Model loading is not
timed. Writes JSON and prints a Markdown table.

  python bench/bench_classify.py                          # writes bench/results.local.json
  python bench/bench_classify.py --vit-l-images 8         # adds a ViT-L/14-336-sized random backbone
  python bench/bench_classify.py --out bench/results.json # the README's figures
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = r"""
import sys, time, json, resource
sys.path.insert(0, {root!r})
import torch
from PIL import Image
from remote_code import CityClassifierForImageClassification, CityClassifierImageProcessor
model = CityClassifierForImageClassification.from_pretrained({model!r}, dtype=torch.float32).eval()
processor = CityClassifierImageProcessor.from_pretrained({model!r})
files = {files!r}
start = time.time()
with torch.no_grad():
    for path in files:
        image = Image.open(path).convert("RGB")
        scores = model(**processor(image, return_tensors="pt")).scores
print(json.dumps({{"seconds": time.time() - start}}))
"""


def make_images(folder, count, seed):
    """Synthetic illustrations at the sizes a dataset holds (768-2048 px), half of them aberrated."""
    import numpy as np

    from make_synthetic_data import make_example

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        image, _, _ = make_example(int(rng.integers(0, 2**31)), "shift" if i % 2 else "clean", [])
        path = folder / f"{i:04d}.png"
        image.save(path, compress_level=1)
        files.append(str(path))
    return files


WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(done.returncode)")


def run_measured(command):
    """Runs a command under a fresh wrapper process, so that RUSAGE_CHILDREN sees only it and its
    workers; returns (stdout, stderr, peak RSS in MB of its largest process)."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    *stderr, peak_kb = done.stderr.rstrip("\n").split("\n")
    return done.stdout, "\n".join(stderr), int(peak_kb) / 1024


def bench(model, files, workdir, label, extra=(), repeat=3):
    """Runs the baseline and classify.py `repeat` times each, alternating, so that a noisy neighbour
    hits both alike; the headline is each one's best run (all runs are in the JSON)."""
    code = BASELINE.format(root=str(ROOT), model=str(model), files=files)
    listing = workdir / f"{label}.txt"
    listing.write_text("\n".join(files) + "\n")
    results = workdir / f"{label}.jsonl"
    base_runs, ours_runs, base_rss, ours_rss = [], [], 0.0, 0.0
    for _ in range(repeat):
        out, _, rss = run_measured([sys.executable, "-c", code])
        base_runs.append(json.loads(out.strip().splitlines()[-1])["seconds"])
        base_rss = max(base_rss, rss)
        _, err, rss = run_measured([sys.executable, str(ROOT / "classify.py"), f"@{listing}", "--model", str(model),
                                    "--out", str(results), "--no-resume", *extra])
        summary = [line for line in err.splitlines() if " scored, " in line][-1]
        ours_runs.append(float(summary.split(" in ")[1].split("s ")[0]))
        ours_rss = max(ours_rss, rss)
    n, base_seconds, ours_seconds = len(files), min(base_runs), min(ours_runs)
    return {
        "model": label, "images": n, "repeat": repeat,
        "baseline": {"images_per_s": n / base_seconds, "s_per_image": base_seconds / n, "peak_rss_mb": base_rss,
                     "runs_s": base_runs},
        "classify": {"images_per_s": n / ours_seconds, "s_per_image": ours_seconds / n, "peak_rss_mb": ours_rss,
                     "args": list(extra), "runs_s": ours_runs},
        "speedup": base_seconds / ours_seconds,
    }


def machine():
    """The CPU by name and the features that decide the dtype and the kernels: a figure means little without it."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", "x86_64", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpus": os.cpu_count(), "processor": name, "features": features}


def vit_l_model(folder):
    """A random ViT-L/14-336-sized CityClassifier (what a converted original runs)."""
    from transformers import CLIPVisionConfig

    from remote_code import CityClassifierConfig, CityClassifierForImageClassification, CityClassifierImageProcessor

    config = CityClassifierConfig(vision_config=CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768))
    CityClassifierForImageClassification(config).save_pretrained(folder)
    CityClassifierImageProcessor().save_pretrained(folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT), help="model folder (default: the shipped model)")
    parser.add_argument("--images", type=int, default=240, help="images for the default model (default: 240)")
    parser.add_argument("--vit-l-images", type=int, default=0, help="images for a ViT-L-sized model (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; the best counts (default: 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.local.json",
                        help="JSON to write (default: bench/results.local.json, not committed; the README's "
                             "figures are in bench/results.json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_images(tmp / "images", args.images, args.seed)
        runs = [bench(args.model, files, tmp, "default", repeat=args.repeat)]
        if args.vit_l_images:
            runs.append(bench(vit_l_model(tmp / "vit-l"), files[: args.vit_l_images], tmp, "vit-l-14-336",
                              repeat=args.repeat))
    report = {"machine": machine(), "runs": runs, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['machine']['processor']}, {report['machine']['cpus']} cores, "
          f"{' '.join(report['machine']['features']) or 'no AVX2'}; best of {args.repeat} runs each")
    print("| model | images | baseline img/s | classify img/s | speed-up | baseline peak RSS | classify peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['model']} | {r['images']} | {r['baseline']['images_per_s']:.2f} | "
              f"{r['classify']['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['baseline']['peak_rss_mb']:.0f} MB | "
              f"{r['classify']['peak_rss_mb']:.0f} MB |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
