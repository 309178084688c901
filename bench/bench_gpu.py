#!/usr/bin/env python
"""GPU throughput of every path that should keep a GPU busy, in one run, as figures and JSON.

It makes its own data (make_synthetic_data.py) and its own random ViT-L/14-336-sized model folder
(nothing from the Hub), then measures:
- the raw backbone's crops/s (fp16 and bf16, sdpa, `--raw-batch` crops a call): the ceiling; and
  in fp16 at 3/10 of that batch (48 crops), about the smallest batch classify.py gives an idle GPU;
- a fresh process's first backbone calls (20 blank views twice, then 160 twice): what classify.py's
  warm-up, run while its decoding workers start, takes off its first batch;
- the data path alone (classify.py's decoding workers and batches, no model), with views cut by
  the workers (the default) and by the GPU (workers only decode): the crops/s the CPUs can feed;
  and, where pyspng is installed, the latter again with Pillow decoding every PNG (libspng's gain);
- classify.py's crops/s with its defaults and with `--crop-on device` (the GPU cuts the views), the
  ratio to the raw fp16 figure, how busy the GPU was over the whole run (start-up included) and its
  "time:" line (the wait for the first batch, for decoded images, for the model);
  with `--models DIR ...` (trained models, e.g. one with native-resolution streams), each one's data
  path alone, classify.py's img/s and GPU busy % on the same data, and its precision agreement;
  then with its default crops on the collection `--repeat` times over (hard links): the rate once
  the pipeline is full (the extra crops over the extra seconds) and the fixed seconds; with
  `--baseline DIR`, another checkout's classify.py first, on the same data and model (a
  before/after in one run);
- the original's one-image loop (open, convert, processor, model), img/s in fp16;
- head-only training's embedding pass (citytools.embedding.embed_all), crops/s, ratio to the raw figure and
  where its seconds went;
- the original's head-only recipe end to end (train_hf.py), `--recipes`: by default at batch 1 with
  the head in fp16 autocast (as the original) and in fp32, and at batch 32: head steps/s, and the
  time for 3215 images and 30K steps (also with train_hf.py's own start-up), and for 30K images
  seen, extrapolated from the embedding rate and steps/s;
- batch-1 head steps/s (bench_head_steps.py): Trainer as it comes against train_hf's HeadOnlyTrainer
  (the frozen backbone set aside) and the head alone in a plain loop (the floor), and the share of the
  floor that the batch-1 recipe reaches (what Trainer's per-step cost leaves);
- full-mode training steps/s with the shipped model's config (configs/default_model.json);
- how often the host waits for the GPU while it queues one scoring batch (0: it can prepare the next
  batch meanwhile; torch's sync debug mode);
- the shipped model's scores on 100 of the images on the GPU (fp16, and float32) against the CPU
  (float32), and with views cut by the GPU against cut by the workers (both on the GPU): largest
  difference and decisions flipped at 0.5.
A crop is one 336 px view through the backbone: five for a tiled image, one otherwise.

  python bench/bench_gpu.py --out bench/gpu.json            # on a CUDA machine, about 6 minutes
  python bench/bench_gpu.py --dry-run --out /tmp/gpu.json   # the same code paths, tiny, on a CPU

--dry-run uses a tiny CLIP, a dozen small images and a few steps, in float32 on the CPU: it checks
that every path runs (a test runs it; the fp16, bf16 and batch-32 recipes and classify.py --crop-on
device are the same code at other settings, left out there), and its figures mean nothing.

Each measurement that fails is recorded as {"error": ...} and the others still run; the JSON is
rewritten after each one, so a run cut short keeps what it measured. Exit 1 if any failed.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from gpu_measures import (  # noqa: E402
    agreement,
    classify_run,
    count_crops,
    data_path,
    data_path_with_pillow,
    full_training,
    head_only_embedding,
    head_only_recipe,
    head_steps,
    host_waits,
    in_fresh_python,
    log,
    make_data,
    original_loop,
    random_model,
    raw_backbone,
    recipe_list,
    repeated_folder,
)

from citytools import images as decoding  # noqa: E402


class Report:
    """The run's JSON: `measure(name, what, *call)` sets report[name] = what(*call), or {"error": ...}
    (one failed measurement never loses the others), and rewrites the file either way."""

    def __init__(self, out, skip, **fields):
        self.out, self.skip, self.data, self.failed = out, skip, dict(fields), []
        out.parent.mkdir(parents=True, exist_ok=True)

    def __getitem__(self, name):
        return self.data[name]

    def get(self, name, default=None):
        return self.data.get(name, default)

    def write(self):
        self.out.write_text(json.dumps(self.data, indent=2) + "\n")

    def measure(self, name, what, *call):
        if name in self.skip:
            return {"skipped": True}
        log(f"{name}: measuring")
        begin = time.perf_counter()
        try:
            self.data[name] = what(*call)
        except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
            traceback.print_exc()
            self.data[name] = {"error": f"{type(error).__name__}: {str(error)[-2000:]}"}
            self.failed.append(name)
        log(f"{name}: {time.perf_counter() - begin:.1f}s {json.dumps(self.data[name])}")
        self.write()
        return self.data[name]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu.local.json", help="JSON to write")
    parser.add_argument("--images", type=int, default=600, help="synthetic images (default: 600)")
    parser.add_argument("--raw-batch", type=int, default=160, help="crops per raw backbone call (default: 160)")
    parser.add_argument("--train-steps", type=int, default=40, help="full-mode training steps (default: 40)")
    parser.add_argument("--head-steps", type=int, default=1200,
                        help="head-only recipe steps at batch 1, a third of them at 32 (default: 1200; 30K "
                             "extrapolated)")
    parser.add_argument("--recipes", type=recipe_list, default=recipe_list("1:fp16,1:fp32,32:fp16"),
                        metavar="BATCH:PRECISION,...",
                        help="head-only recipe runs, the head in fp16 (autocast, as the original), bf16 or fp32 "
                             "(default: 1:fp16,1:fp32,32:fp16; a CPU runs 1:fp32 only)")
    parser.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                        help="measurements to leave out, by their JSON key (e.g. full_training_steps_per_s)")
    parser.add_argument("--raw-seconds", type=float, default=5, help="seconds per raw backbone figure (default: 5)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="classify.py (with its default crops, and --baseline's) also runs on a collection this "
                             "many times as large (hard links to the same files): its rate with the pipeline full "
                             "(default: 3; 0: not)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="another checkout (e.g. `git worktree add /tmp/base HEAD~3`) whose classify.py runs "
                             "on the same data and model first, for a before/after in one run")
    parser.add_argument("--models", type=Path, nargs="*", default=[], metavar="DIR",
                        help="trained model folders also measured on the same data: the data path alone, "
                             "classify.py's img/s and GPU busy %%, and the precision agreement (JSON keys "
                             "<key>_<folder name>)")
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU: checks every path, under 2 minutes")
    args = parser.parse_args()
    if args.dry_run:
        args.images, args.raw_batch, args.train_steps, args.head_steps = 12, 8, 4, 20
        args.repeat = min(args.repeat, 2)
    return args


def backbone_phase(report, run, model):
    """The raw backbone's rates (the ceiling every other figure is a share of), the first calls, the
    host's waits and the dtypes' agreement. -> the ceiling (crops/s in the first half precision)."""
    args, device, half = run.args, run.device, run.half
    raw = report.measure("raw_backbone_crops_per_s", lambda backbone: {
        str(dtype).split(".")[1]: raw_backbone(backbone, device, dtype, args.raw_batch,
                                               1 if args.dry_run else args.raw_seconds)
        for dtype in half}, model)
    # the smallest batch classify.py hands an idle GPU (citytools.loading.first_batch of 64 images, ~3 views each)
    report.measure("raw_backbone_small_batch", lambda backbone: {
        "crops": (small := args.raw_batch * 3 // 10),
        "crops_per_s": raw_backbone(backbone, device, half[0], small, 1 if args.dry_run else 2)}, model)
    report.measure("first_calls", in_fresh_python, "first_calls", run.model_dir, device.type)
    report.measure("host_waits_per_batch", host_waits, run.files, device)
    report.measure("precision_agreement", agreement, run.files[: min(len(run.files), 100)], device)
    return raw.get(str(half[0]).split(".")[1])


def ratio(run, crops_per_s):
    return crops_per_s / run.ceiling if run.ceiling and crops_per_s else None


def classify(run, *extra, copies=1, root=ROOT, model_dir=None):
    """classify.py on the data (`copies` times over), its rates against the ceiling."""
    files, tmp = run.files, run.tmp
    folder = tmp / "data" / "train" if copies == 1 else repeated_folder(files, tmp / f"x{copies}", copies)
    seconds, busy, phases = classify_run(folder, model_dir or run.model_dir, tmp / "scores.jsonl", run.device, extra,
                                         root)
    return {"crops_per_s": copies * run.crops / seconds, "images_per_s": copies * len(files) / seconds,
            "ratio_to_raw": ratio(run, copies * run.crops / seconds), "gpu_busy_percent": busy,
            "options": " ".join(extra), "seconds": seconds, "time": phases}


def classify_phase(report, run):
    """The data path alone, classify.py (its crops, the GPU's crops, a baseline checkout, the
    collection repeated: the rate with the pipeline full) and the original's loop."""
    args, data = run.args, run.tmp / "data" / "train"
    for crop in ("device", "workers"):  # on a CPU (a dry run) too
        report.measure(f"data_path_crop_{crop}", lambda crop=crop: {
            **(path := data_path(data, run.model_dir, run.device, crop)),
            "ratio_to_raw": ratio(run, path["crops_per_s"])})
    if decoding.pyspng is not None:
        report.measure("data_path_crop_device_pillow", lambda: {
            **(path := data_path_with_pillow(data, run.model_dir, run.device)),
            "ratio_to_raw": ratio(run, path["crops_per_s"])})
    runs = [("classify", ())]
    if args.baseline is not None:
        report.measure("baseline_classify", lambda: {**classify(run, root=args.baseline), "code": str(args.baseline)})
        runs.insert(0, ("baseline_classify", ()))
    report.measure("classify", classify, run)
    if not args.dry_run:  # on a CPU, tests/test_device_crops.py runs classify.py --crop-on device
        report.measure("classify_crop_on_device", classify, run, "--crop-on", "device")
    if args.repeat > 1:
        for base, extra in runs:
            repeated(report, run, base, extra)
    loop = report.measure("original_loop_images_per_s", original_loop, run.model_dir,
                          run.files[: min(len(run.files), 100)], run.device, run.half[0])
    if isinstance(loop, float) and "error" not in report["classify"]:
        report["classify"]["speedup_over_original_loop"] = report["classify"]["images_per_s"] / loop


def repeated(report, run, base, extra):
    """`base`'s run on the collection `--repeat` times over: the extra copies' crops over the extra
    seconds (the rate once the pipeline is full) and the fixed seconds."""
    one = report.get(base, {})
    if "seconds" not in one:
        return  # its one-copy run failed or was left out: no rate to tell from the fixed costs
    copies = run.args.repeat
    root = run.args.baseline if base.startswith("baseline") else ROOT
    bigger = report.measure(f"{base}_x{copies}", lambda: classify(run, *extra, copies=copies, root=root))
    if "seconds" in bigger:
        extra_s = bigger["seconds"] - one["seconds"]
        rate = (copies - 1) * run.crops / extra_s if extra_s > 0 else None
        bigger.update(marginal_crops_per_s=rate, marginal_ratio_to_raw=ratio(run, rate),
                      fixed_s=one["seconds"] - run.crops / rate if rate else None)
        report.write()


def models_phase(report, run):
    """Each `--models` folder on the same data: the data path alone (what the CPUs feed: decoding and,
    for a model with native-resolution streams, its measurements), classify.py (img/s, GPU busy %),
    the precision agreement. No ratio: the ceiling is ViT-L's."""
    data = run.tmp / "data" / "train"
    for model_dir in run.args.models:
        name = model_dir.name
        report.measure(f"data_path_crop_workers_{name}", data_path, data, model_dir, run.device, "workers")
        report.measure(f"classify_{name}", lambda model_dir=model_dir: {
            **{k: v for k, v in classify(run, model_dir=model_dir).items() if k != "ratio_to_raw"},
            "model": str(model_dir)})
        report.measure(f"precision_agreement_{name}", agreement, run.files[: min(len(run.files), 100)], run.device,
                       model_dir)


def training_phase(report, run):
    """Head-only training's embedding pass and recipes, batch-1 head steps, full-mode training."""
    args, tmp, device = run.args, run.tmp, run.device

    def embedding():
        rate, embedded, phases = head_only_embedding(tmp / "data", run.model_dir, device, run.half[0])
        return {"crops_per_s": rate, "crops": embedded, "ratio_to_raw": ratio(run, rate), "time": phases}

    embed = report.measure("head_only_embedding", embedding)
    if "crops_per_s" in embed:
        # a dry run (a CPU, no autocast) runs fp32 at batch 1 only: the others are the same code
        for batch, precision in [(1, "fp32")] if args.dry_run else args.recipes:
            name = f"head_only_recipe_batch_{batch}" + ("" if precision == "fp16" or args.dry_run else f"_{precision}")
            steps = args.head_steps if batch == 1 else args.head_steps // 3
            report.measure(name, head_only_recipe, tmp / "data", run.model_dir, tmp / name, device, steps, batch,
                           embed["crops_per_s"], run.crops / len(run.files), precision)
    report.measure("head_steps", head_steps, run.model_dir, device, max(20, args.head_steps // 2),
                   report.get("head_only_recipe_batch_1", {}).get("steps_per_s"))
    report.measure("full_training_steps_per_s", full_training, tmp / "data", tmp / "run", device, args.train_steps)


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("error: no CUDA device: run this on a GPU machine, or pass --dry-run")
    half = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    report = Report(args.out, args.skip,
                    device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
                    cores=os.cpu_count(), torch=torch.__version__, dry_run=args.dry_run,
                    png_decoder="libspng" if decoding.pyspng is not None else "pillow")  # what the workers decode with
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log("making data and a random ViT-L/14-336 folder")
        files = make_data(tmp / "data", args.images, args.dry_run)
        model_dir = random_model(tmp / "vit-l", args.dry_run)
        from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

        crops = count_crops(files, CityClassifierImageProcessor.from_pretrained(model_dir))
        report.data["data"] = {"images": len(files), "crops": crops}
        run = SimpleNamespace(args=args, device=device, half=half, tmp=tmp, files=files, model_dir=model_dir,
                              crops=crops, ceiling=None)
        model = CityClassifierForImageClassification.from_pretrained(model_dir)
        run.ceiling = backbone_phase(report, run, model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        classify_phase(report, run)
        models_phase(report, run)
        training_phase(report, run)
    print(json.dumps(report.data, indent=2))
    log(f"wrote {args.out}" + (f"; failed: {', '.join(report.failed)}" if report.failed else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
