#!/usr/bin/env python
"""Throughput and memory of classify.py against the original folder script's loop, in one run.

The baseline reproduces the original: one image at a time, opened and converted to RGB, through
the processor, then the model, in float32. classify.py runs with its defaults (batched, parallel
decoding, float32 on a CPU). Both score the same images with the same model; each runs in its own
subprocess, so peak RSS (ru_maxrss, largest process) is comparable. Model loading is not timed. Runs
go in rounds: every model and dtype on the same images once a round (baseline, then classify.py), so
a ratio between them is measured under the same conditions. Writes JSON and prints a Markdown table.

  python bench/bench_classify.py                          # writes bench/results.local.json
  python bench/bench_classify.py --vit-l-images 8         # adds a ViT-L/14-336-sized random backbone
  python bench/bench_classify.py --out bench/results.json # the README's figures
  python bench/bench_classify.py --profile 60              # adds where an image's time goes, stage by stage
  python bench/bench_classify.py --dtypes bfloat16         # adds classify.py --dtype bfloat16 on the same images
                                                           # (and on the ViT-L's, with --vit-l-images)
  python bench/bench_classify.py --native-streams --compare .  # the architecture of stages 7-12 against stage 5
  python bench/bench_classify.py --compare runs/default_model_stage3 --large-images 12
      # also: classify.py with another model on the same images (the speed ratio of a new default
      # model), and 4000x3000 pictures scored with five crops and with grid tiling (crops per MP)
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
from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor
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

    from citytools.cli.make_synthetic_data import make_example

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        image, _, _ = make_example(int(rng.integers(0, 2**31)), "shift" if i % 2 else "clean", [])
        path = folder / f"{i:04d}.png"
        image.save(path, compress_level=1)
        files.append(str(path))
    return files


def make_large_images(folder, count, seed, size=(4000, 3000)):
    """Drawn illustrations (12 megapixels by default), half with a 1.5 px shift: where grid tiling matters."""
    import numpy as np

    from citytools.aberrations import channel_shift
    from citytools.drawing import draw_illustration

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        image = draw_illustration(rng, *size)
        image = channel_shift(image, rng, 1.5) if i % 2 else image
        path = folder / f"large-{i:04d}.png"
        image.save(path, compress_level=1)
        files.append(str(path))
    return files


def crops_per_megapixel(model, files, mode):
    """Views per megapixel that `mode` tiling cuts from these files (their sizes only)."""
    from PIL import Image

    from citytools.remote import CityClassifierImageProcessor

    processor = CityClassifierImageProcessor.from_pretrained(model).with_options(tiling_mode=mode)
    views = pixels = 0
    for path in files:
        with Image.open(path) as image:
            views += len(processor.views(image))
            pixels += image.width * image.height
    return views / (pixels / 1e6)


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
    """One model's `bench_rounds`."""
    return bench_rounds([(model, files, label, extra)], workdir, repeat)[0]


def bench_rounds(jobs, workdir, repeat=3):
    """jobs: [(model, files, label, classify.py's extra arguments)]. Runs each job's baseline and its
    classify.py `repeat` times, in rounds (every job once a round, the baseline then classify.py), so
    that a noisy neighbour, or a machine getting quieter, hits every job and both sides alike; the
    headline is each one's best run (all runs are in the JSON)."""
    state = []
    for model, files, label, _extra in jobs:
        listing = workdir / f"{label}.txt"
        listing.write_text("\n".join(files) + "\n")
        state.append({"code": BASELINE.format(root=str(ROOT), model=str(model), files=files), "listing": listing,
                      "base_runs": [], "ours_runs": [], "base_rss": 0.0, "ours_rss": 0.0})
    for _ in range(repeat):
        for (model, _files, label, extra), job in zip(jobs, state):
            out, _, rss = run_measured([sys.executable, "-c", job["code"]])
            job["base_runs"].append(json.loads(out.strip().splitlines()[-1])["seconds"])
            job["base_rss"] = max(job["base_rss"], rss)
            _, err, rss = run_measured([sys.executable, str(ROOT / "classify.py"), f"@{job['listing']}", "--model",
                                        str(model), "--out", str(workdir / f"{label}.jsonl"), "--no-resume", *extra])
            summary = [line for line in err.splitlines() if " scored, " in line][-1]
            job["ours_runs"].append(float(summary.split(" in ")[1].split("s ")[0]))
            job["ours_rss"] = max(job["ours_rss"], rss)
    reports = []
    for (_model, files, label, extra), job in zip(jobs, state):
        n, base_seconds, ours_seconds = len(files), min(job["base_runs"]), min(job["ours_runs"])
        reports.append({
            "model": label, "images": n, "repeat": repeat,
            "baseline": {"images_per_s": n / base_seconds, "s_per_image": base_seconds / n,
                         "peak_rss_mb": job["base_rss"], "runs_s": job["base_runs"]},
            "classify": {"images_per_s": n / ours_seconds, "s_per_image": ours_seconds / n,
                         "peak_rss_mb": job["ours_rss"], "args": list(extra), "runs_s": job["ours_runs"]},
            "speedup": base_seconds / ours_seconds,
        })
    return reports


def scores_of(results):
    """{path: the first label's score} of a classify.py output."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return {row["path"]: next(v for k, v in row.items() if ":" in k and isinstance(v, float)) for row in rows}


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


# CLIP ViT-L/14-336's vision tower (what a converted original runs), for random models of its size
VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
         "image_size": 336, "patch_size": 14, "projection_dim": 768}


def vit_l_model(folder):
    """A random ViT-L/14-336-sized CityClassifier."""
    from transformers import CLIPVisionConfig

    from citytools.remote import (
        CityClassifierConfig,
        CityClassifierForImageClassification,
        CityClassifierImageProcessor,
    )

    config = CityClassifierConfig(vision_config=CLIPVisionConfig(**VIT_L))
    CityClassifierForImageClassification(config).save_pretrained(folder)
    CityClassifierImageProcessor().save_pretrained(folder)
    return folder


def with_native_streams(model, folder, patch_channels=None, patch_count=None):
    """`model` with the native-resolution measurement and the patch stream added (their new weights
    random: the speed of that architecture, stage 7's and later, needs no trained copy of it), the
    stream `patch_channels` wide over `patch_count` patches (None: its defaults)."""
    import torch

    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    torch.manual_seed(0)
    network = CityClassifierForImageClassification.from_pretrained(model)
    if not getattr(network.config, "native_patches", None):
        if not getattr(network.config, "native_fringes", None):
            network.add_native_fringes()
        options = {name: value for name, value in (("channels", patch_channels), ("count", patch_count)) if value}
        network.add_native_patches(options or None)
    processor = CityClassifierImageProcessor.from_pretrained(model).with_options(
        native_fringes=network.config.native_fringes, native_patches=network.config.native_patches)
    network.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def profile(model, files, batch=8):
    """Where an image's time goes, in one process on one thread, stage by stage (ms per image): what
    classify.py's decoding workers do (decode, `views`: the tiling resize and crops, CLIP's resize
    and crop, normalising) and what its model does (the stem's full-resolution convolutions, the
    fringe measurements, the CLIP tower on the stem's output, the head), in float32. A model that reads
    the picture at native resolution adds the processor's native measurements (and patches) to the
    workers' side and its patch stream to the model's."""
    import torch

    from citytools.images import load_image
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    processor = CityClassifierImageProcessor.from_pretrained(model)
    model = CityClassifierForImageClassification.from_pretrained(model, dtype=torch.float32).eval()
    seconds, views, natives = {}, [], []

    def timed(stage, step, *args):
        start = time.perf_counter()
        out = step(*args)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        return out

    try:
        for path in files:
            image = timed("decode", load_image, path)
            cut = timed("views (tiling resize, crops)", processor.views, image)
            crops = timed("CLIP resize and crop", lambda vs: [processor.resize_and_crop(v) for v in vs], cut)
            views.append(torch.from_numpy(timed("normalise", processor.normalize_views, crops)))
            natives.append(timed("native measurements", processor.native_inputs, image) if processor.native_fringes
                           else {})
        with torch.inference_mode():
            for start in range(0, len(views), batch):
                pixels = torch.cat(views[start : start + batch])
                features = timed("stem", model._stem_features, pixels) if model.stem is not None else pixels
                embeds = timed("CLIP tower", lambda f: model.clip(pixel_values=f).image_embeds, features)
                if model.fringe is not None:
                    embeds = torch.cat([embeds, timed("fringe measurements", model.fringe, pixels)], 1)
                if natives[start]:  # each view gets its picture's native inputs, as the model's _head_input does
                    native = {k: torch.stack([torch.from_numpy(n[k]) for n in natives[start : start + batch]])
                              for k in natives[start]}
                    row = native["fringe_values"].clamp_min(0).log1p()
                    if model.patch_stream is not None:
                        row = torch.cat([row, timed("patch stream", model.patch_stream, native["fringe_patches"])], 1)
                    per_view = torch.tensor([len(v) for v in views[start : start + batch]])
                    embeds = torch.cat([embeds, row.repeat_interleave(per_view, 0)], 1)
                timed("head", model.head, embeds)
    finally:
        torch.set_num_threads(threads)
    stages = {stage: 1000 * s / len(files) for stage, s in seconds.items()}
    return {"images": len(files), "views_per_image": sum(len(v) for v in views) / len(files), "threads": 1,
            "ms_per_image": stages, "total_ms_per_image": sum(stages.values())}


def dtype_changes(runs, dtypes, workdir, label):
    """runs[0] is `label` in float32, runs[1:] the same images in each of `dtypes`: each of those gets its
    largest score change against float32, and the extras its speed against it."""
    reference, extras = scores_of(workdir / f"{label}.jsonl"), {}
    for dtype, run in zip(dtypes, runs[1:]):
        changes = [abs(a - reference[path]) for path, a in scores_of(workdir / f"{label}-{dtype}.jsonl").items()]
        run["max_score_change_vs_default"] = max(changes)
        extras[f"{dtype}_vs_{label}_img_per_s"] = run["classify"]["images_per_s"] / runs[0]["classify"]["images_per_s"]
    return extras


def print_report(report, repeat):
    """The runs as a markdown table, then the ratios and the profile."""
    runs = report["runs"]
    extras = {k: v for k, v in report.items() if k not in ("machine", "models", "runs", "date")}
    print(f"{report['machine']['processor']}, {report['machine']['cpus']} cores, "
          f"{' '.join(report['machine']['features']) or 'no AVX2'}; best of {repeat} runs each")
    print("; ".join(f"{label}: {folder}" for label, folder in report["models"].items()))
    print("| model | images | baseline img/s | classify img/s | speed-up | baseline peak RSS | classify peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['model']} | {r['images']} | {r['baseline']['images_per_s']:.2f} | "
              f"{r['classify']['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['baseline']['peak_rss_mb']:.0f} MB | "
              f"{r['classify']['peak_rss_mb']:.0f} MB |")
    for r in runs:
        if "crops_per_megapixel" in r:
            print(f"{r['model']}: {r['crops_per_megapixel']:.2f} crops per megapixel")
    for name, value in extras.items():
        if name != "profile":
            print(f"{name}: {value:.2f}x")
    if "profile" in extras:
        p = extras["profile"]
        print(f"\nWhere an image's time goes ({p['images']} images, {p['views_per_image']:.1f} views each, 1 thread):")
        print("| stage | ms per image | share |\n| --- | --- | --- |")
        for stage, ms in p["ms_per_image"].items():
            print(f"| {stage} | {ms:.1f} | {ms / p['total_ms_per_image']:.0%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT), help="model folder (default: the shipped model)")
    parser.add_argument("--images", type=int, default=240, help="images for the default model (default: 240)")
    parser.add_argument("--vit-l-images", type=int, default=0, help="images for a ViT-L-sized model (0: skip)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds: each run once a round, the best counts (default: 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.local.json",
                        help="JSON to write (default: bench/results.local.json, not committed; the README's "
                             "figures are in bench/results.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", help="another model folder run on the same images (e.g. the previous default "
                                          "model): classify.py's img/s with --model relative to it is reported")
    parser.add_argument("--native-streams", action="store_true",
                        help="score with --model plus the native-resolution measurement and the patch stream "
                             "(random new weights: that architecture's speed without a trained copy), e.g. "
                             "against --compare . (the shipped model)")
    parser.add_argument("--patch-channels", type=int, default=None,
                        help="with --native-streams: the patch stream's width (default: its default, 16)")
    parser.add_argument("--patch-count", type=int, default=None,
                        help="with --native-streams: patches per picture (default: its default, 32)")
    parser.add_argument("--large-images", type=int, default=0,
                        help="large images scored with five crops and with --tiling-mode grid (0: skip)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also time each stage (decode, resize, normalise, stem, fringe, CLIP, head) on N of "
                             "the images, one thread, in this process (0: skip)")
    parser.add_argument("--dtypes", default="", help="comma-separated dtypes classify.py also runs in on the same "
                        "images (e.g. bfloat16), each with its speed against the default and its largest score "
                        "change against it (default: none)")
    parser.add_argument("--large-size", type=lambda t: tuple(int(v) for v in t.split("x")), default=(4000, 3000),
                        help="their size, WxH (default: 4000x3000)")
    args = parser.parse_args()
    if (args.patch_channels or args.patch_count) and not args.native_streams:
        parser.error("--patch-channels and --patch-count need --native-streams")
    extras = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_images(tmp / "images", args.images, args.seed)
        streams = " with the native streams added" + "".join(
            f", {value} {name}" for name, value in (("patch channels", args.patch_channels),
                                                   ("patches", args.patch_count)) if value)
        models = {"default": str(args.model) + (streams if args.native_streams else ""),
                  **({"compare": str(args.compare)} if args.compare else {})}
        if args.native_streams:
            args.model = with_native_streams(args.model, tmp / "native-streams", args.patch_channels, args.patch_count)
        dtypes = list(filter(None, args.dtypes.split(",")))
        jobs = [(args.model, files, "default", ())]  # every model on these images runs in the same rounds
        jobs += [(args.model, files, f"default-{dtype}", ("--dtype", dtype)) for dtype in dtypes]
        jobs += [(args.compare, files, "compare", ())] if args.compare else []
        runs = bench_rounds(jobs, tmp, repeat=args.repeat)
        extras.update(dtype_changes(runs, dtypes, tmp, "default"))
        if args.compare:
            extras["classify_vs_compare"] = runs[0]["classify"]["images_per_s"] / runs[-1]["classify"]["images_per_s"]
        if args.large_images:
            large = make_large_images(tmp / "large", args.large_images, args.seed, args.large_size)
            modes = ("five", "grid")
            tiled = bench_rounds([(args.model, large, f"large-{mode}", ("--tiling-mode", mode)) for mode in modes],
                                 tmp, repeat=args.repeat)
            for mode, run in zip(modes, tiled):
                run["crops_per_megapixel"] = crops_per_megapixel(args.model, large, mode)
                runs.append(run)
            five, grid = runs[-2]["classify"]["images_per_s"], runs[-1]["classify"]["images_per_s"]
            extras["grid_vs_five_img_per_s"] = grid / five
        if args.profile:
            extras["profile"] = profile(args.model, files[: args.profile])
        if args.vit_l_images:  # in float32 and in each of --dtypes, as the shipped model
            vit_l, few, label = vit_l_model(tmp / "vit-l"), files[: args.vit_l_images], "vit-l-14-336"
            vit_runs = bench_rounds([(vit_l, few, label, ())] + [(vit_l, few, f"{label}-{dtype}", ("--dtype", dtype))
                                                                 for dtype in dtypes], tmp, repeat=args.repeat)
            extras.update(dtype_changes(vit_runs, dtypes, tmp, label))
            runs += vit_runs
    report = {"machine": machine(), "models": models, "runs": runs, "date": time.strftime("%Y-%m-%d"), **extras}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, args.repeat)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
