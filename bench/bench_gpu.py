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
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from citytools import images as decoding  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def log(text):
    print(text, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(folder, images, dry_run):
    """A synthetic image folder (train/ and validation/ splits) of 256-2048 px images."""
    command = [sys.executable, str(ROOT / "make_synthetic_data.py"), "--out", str(folder), "--train", str(images),
               "--validation", str(max(4, images // 20)), "--test", "0", "--seed", "0"]
    subprocess.run(command, check=True, env=ENV, capture_output=True)
    files = sorted((folder / "train").rglob("*.png"))
    if dry_run:  # small images only: a CPU must get through them in seconds
        from PIL import Image

        for path in files:
            with Image.open(path) as image:
                small = image.convert("RGB").resize((min(image.width, 180), min(image.height, 150)))
            small.save(path)
    return files


def random_model(folder, dry_run):
    """A random CityClassifier with ViT-L/14-336's backbone (a tiny CLIP with --dry-run)."""
    from bench_classify import VIT_L
    from bench_head_steps import TINY
    from transformers import CLIPVisionConfig

    from citytools.remote import (
        CityClassifierConfig,
        CityClassifierForImageClassification,
        CityClassifierImageProcessor,
    )

    vision = CLIPVisionConfig(**(TINY if dry_run else VIT_L))
    if dry_run:
        processor = CityClassifierImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    else:
        processor = CityClassifierImageProcessor()
    torch.manual_seed(0)
    model = CityClassifierForImageClassification(CityClassifierConfig(vision_config=vision, head_hidden_size=1024))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def count_crops(files, processor):
    from PIL import Image

    total = 0
    for path in files:
        with Image.open(path) as image:
            total += 5 if processor.is_tiled(*image.size) else 1
    return total


def raw_backbone(model, device, dtype, batch, seconds):
    """Crops/s of get_image_features alone on random pixels already on the device."""
    model = model.to(device, dtype).eval()
    size = model.config.pixel_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):
            model.get_image_features(pixels)
        sync(device)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.get_image_features(pixels)
            calls += 1
            sync(device)
    return calls * batch / (time.perf_counter() - start)


class GpuBusy:
    """Samples the GPU's utilisation (NVML, through torch) every 0.1 s while in the `with` block:
    the mean is how busy the card was. None where NVML is not there (a CPU, a dry run)."""

    def __init__(self, device):
        self.device, self.samples, self.stop = device, [], threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # noqa: BLE001 - no NVML: no figure
                return self
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc):
        self.stop.set()

    @property
    def percent(self):
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def classify_run(data, model_dir, out, device, extra=(), root=ROOT):
    """(seconds of scoring, as classify.py reports them, mean GPU busy % over the whole run or None,
    its "time:" line: where the seconds went, or None from a classify.py without one);
    `root`: the checkout whose classify.py runs (--baseline)."""
    command = [sys.executable, str(root / "classify.py"), str(data), "--model", str(model_dir), "--out", str(out),
               "--no-resume", "--device", device.type, *extra]
    with GpuBusy(device) as busy:
        done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"classify.py failed:\n{done.stderr[-3000:]}")
    summary = [line for line in done.stderr.splitlines() if " scored, " in line][-1]  # "N scored, 0 failed in
    images = int(summary.split()[0]) + int(summary.split()[2])  # 2.3s (260.87 img/s)": the rate has 5 digits
    phases = [line.removeprefix("time: ") for line in done.stderr.splitlines() if line.startswith("time: ")]
    return images / float(summary.split("(")[1].split(" img/s")[0]), busy.percent, (phases or [None])[-1]


def repeated_folder(files, folder, copies):
    """`copies` hard links of every file under `folder` (copy0/, copy1/, ...): a collection
    `copies` times as large with the same pictures, to tell classify.py's fixed costs (workers'
    start, the first batch, the last write) from its rate once the pipeline is full. Made once a
    run: a second call (--baseline's classify.py, then this one's) reuses it; linking again would fail
    and copy each file onto its own hard link."""
    if folder.exists():
        return folder
    for copy in range(copies):
        for i, path in enumerate(files):
            target = folder / f"copy{copy}" / f"{i:05d}{path.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:  # no hard links on this file system
                target.write_bytes(path.read_bytes())
    return folder


def data_path(data, model_dir, device, crop):
    """Crops/s of classify.py's data path alone: its decoding workers and batches, no model call
    (with crop "device" the workers only decode: the GPU's resizing is not in this figure)."""
    from citytools.devices import default_batch_size, default_workers
    from citytools.loading import FileStream, loader_batches
    from citytools.scorer import Scorer
    from citytools.toolkit import MAX_PIXELS

    scorer = Scorer([str(model_dir)], device=device.type, crop=crop)
    workers = default_workers(device)
    stream = FileStream([str(data)], scorer, np.array([], dtype=np.int64), 0, 1, MAX_PIXELS)
    start, crops = time.perf_counter(), 0
    for _, grouped in loader_batches(stream, default_batch_size(device, scorer.models[0].model), workers, device):
        crops += int(grouped[0][1].sum()) if grouped else 0
    return {"crops_per_s": crops / (time.perf_counter() - start), "workers": workers, "crop_mode": scorer.crop_mode}


def data_path_with_pillow(data, model_dir, device):
    """data_path with the workers decoding by Pillow only (pyspng hidden, in a fresh Python), views cut
    on the device: libspng's share of the data path, against data_path_crop_device in the same run."""
    return in_fresh_python("data_path_by_pillow", data, model_dir, device.type, hide_pyspng=True)


def data_path_by_pillow(data, model_dir, device):
    """data_path with views cut on the device, where pyspng was hidden (`data_path_with_pillow`)."""
    assert decoding.pyspng is None
    return data_path(data, model_dir, device, "device")


def original_loop(model_dir, files, device, dtype):
    """Img/s of the original's folder loop: one image at a time, opened, converted, processed, scored."""
    from PIL import Image

    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    processor = CityClassifierImageProcessor.from_pretrained(model_dir)
    with torch.inference_mode():
        model(**processor(Image.open(files[0]).convert("RGB"), return_tensors="pt").to(device, dtype))
        sync(device)
        start = time.perf_counter()
        for path in files:
            inputs = processor(Image.open(path).convert("RGB"), return_tensors="pt").to(device)
            model(pixel_values=inputs["pixel_values"].to(dtype), tile_mask=inputs["tile_mask"]).scores.cpu()
    return len(files) / (time.perf_counter() - start)


def head_only_embedding(data, model_dir, device, dtype):
    """(crops/s, crops, its log line of where the seconds went) of train_hf's embedding pass for
    head-only training over the train split."""
    import logging

    from citytools import embedding, training_data
    from citytools.cli import train_hf
    from citytools.devices import default_batch_size, default_workers
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(model_dir).eval()
    processor = CityClassifierImageProcessor.from_pretrained(model_dir)
    split = training_data.load_splits(train_hf.DataArguments(dataset_name=str(data), eval_split=None))["train"]
    batch = default_batch_size(device, model)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    train_hf.logger.addHandler(handler)
    train_hf.logger.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        embeds, mask = embedding.embed_all(split, model, processor, batch, device, dtype, default_workers(device))
        seconds = time.perf_counter() - start
    finally:
        train_hf.logger.removeHandler(handler)
    assert np.isfinite(embeds).all()
    return int(mask.sum()) / seconds, int(mask.sum()), next((line for line in lines if "embedding pass" in line), None)


def first_calls(model_dir, device):
    """Seconds of a fresh process's first backbone calls in fp16, on blank views: 20 views (what
    classify.py's warm-up runs while its workers start) twice, then 160 views twice (does the small
    warm-up leave a big batch's first call slow?). The first minus the second: what warming up saves."""
    from citytools.remote import CityClassifierForImageClassification

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = CityClassifierForImageClassification.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    size = model.config.pixel_size
    report = {}
    with torch.inference_mode():
        for views in (20, 160):
            pixels = torch.zeros(views, 3, size, size, device=device, dtype=dtype)
            for call in ("first", "second"):
                start = time.perf_counter()
                model.get_image_features(pixels)
                sync(device)
                report[f"{call}_{views}_views_s"] = time.perf_counter() - start
    return report


def in_fresh_python(function, *args, hide_pyspng=False):
    """bench_gpu.`function`(*args) (paths and a device name, given as strings) in a fresh Python: a
    process of its own (a first CUDA call, a decoder left out); -> what it returns, through JSON."""
    code = (("import sys; sys.modules['pyspng'] = None; " if hide_pyspng else "import sys; ") +
            "sys.path[:0] = [sys.argv[1], sys.argv[2]]; import json, torch; from pathlib import Path; "
            "import bench_gpu; args = [torch.device(a) if a in ('cpu', 'cuda') else Path(a) for a in sys.argv[4:]]; "
            "print(json.dumps(getattr(bench_gpu, sys.argv[3])(*args)))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(ROOT), function, *map(str, args)],
                          env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(args, out):
    """Runs train_hf.py on a JSON of arguments; -> its loss.csv rows that carry a steps/s figure."""
    import csv

    config_file = Path(out).with_suffix(".json")
    config_file.write_text(json.dumps(args))
    done = subprocess.run([sys.executable, str(ROOT / "train_hf.py"), str(config_file)], env=ENV,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train_hf.py failed:\n{done.stderr[-3000:]}")
    with open(Path(out) / "loss.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("train_steps_per_second")], done.stderr


def head_only_recipe(data, model_dir, out, device, steps, batch, embed_crops_per_s, crops_per_image, precision):
    """The original's recipe (frozen backbone, cached embeddings, AdamW at 1.5e-6 with cosine
    annealing, 1.0/0.5 loss weights, no gradient clipping, a log line every 100 steps; 30K steps of
    batch 1) through train_hf.py at `batch`, the head in `precision` (fp16 autocast as the original,
    bf16, or fp32: no autocast and no loss scaler): head steps/s, and the time for 3215 images and
    30K steps, and for 30K images seen (30K / batch steps), extrapolated from the embedding rate and
    the steps/s. The embedding pass is fp16 on a GPU whatever the head's precision (bf16 with bf16)."""
    args = {"dataset_name": str(data), "model_name_or_path": str(model_dir), "output_dir": str(out),
            "max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": 1.5e-6,
            "lr_scheduler_type": "cosine", "label_loss_weights": "1.0,0.5", "max_grad_norm": 0.0,
            "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False, "logging_steps": 100,
            "report_to": "none", "seed": 0, "top_loss_images": 0, "fp16": precision == "fp16",
            "bf16": precision == "bf16"}
    if device.type != "cuda":
        args["use_cpu"] = True
    start = time.perf_counter()
    rows, _ = train(args, out)
    wall = time.perf_counter() - start
    steps_per_s = float(rows[-1]["train_steps_per_second"])
    embed_s = 3215 * crops_per_image / embed_crops_per_s
    startup = wall - steps / steps_per_s  # imports, the model, the data (and their embedding, unless cached)
    return {"batch": batch, "precision": precision, "steps": steps, "steps_per_s": steps_per_s, "wall_s": wall,
            "recipe_3215_images_30k_steps_s_extrapolated": embed_s + 30000 / steps_per_s,
            "recipe_3215_images_30k_steps_with_startup_s": startup + embed_s + 30000 / steps_per_s,
            "recipe_3215_images_30k_seen_s_extrapolated": embed_s + 30000 / batch / steps_per_s}


def head_steps(model_dir, device, steps, recipe_steps_per_s=None):
    """bench_head_steps.py on this run's ViT-L folder, one round: batch-1 head steps/s with Trainer as it
    comes, with train_hf's HeadOnlyTrainer (the backbone set aside) and in a plain loop (the floor),
    and the share of the floor that the batch-1 recipe through train_hf.py reached."""
    from bench_head_steps import measure

    from citytools.remote import CityClassifierForImageClassification

    model = CityClassifierForImageClassification.from_pretrained(model_dir)
    for module in model.backbone_modules():
        module.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(model, device, steps, 1, Path(tmp))
    return {**figures, "recipe_batch_1_share": recipe_steps_per_s / figures["plain_loop"] if recipe_steps_per_s
            else None}


def full_training(data, out, device, steps):
    """Steps/s of full-mode training with the shipped model's architecture and batch (Trainer's figure)."""
    config = json.loads((ROOT / "configs" / "default_model.json").read_text())
    keep = ("vision_config", "stem", "stem_aux_loss_weight", "head_hidden_size", "class_names",
            "per_device_train_batch_size", "learning_rate", "bf16")
    args = {**{k: config[k] for k in keep}, "dataset_name": str(data), "output_dir": str(out), "max_steps": steps,
            "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False, "logging_steps": steps,
            "report_to": "none", "dataloader_num_workers": max(1, (os.cpu_count() or 2) - 1), "seed": 0}
    if device.type != "cuda":
        args.update(use_cpu=True, bf16=False, per_device_train_batch_size=4)
    rows, _ = train(args, out)
    return float(rows[-1]["train_steps_per_second"])


def host_waits(files, device):
    """Calls that make the host wait for the GPU while Scorer.submit queues one batch of the shipped
    model (torch's sync debug mode), with views cut by the workers and by the GPU: 0 means the host
    can cut and queue the next batch while the GPU still runs this one."""
    from citytools.images import load_image
    from citytools.loading import collate
    from citytools.scorer import Scorer

    if device.type != "cuda":
        return {"skipped": "no CUDA: nothing waits on a CPU"}
    report = {}
    for crop in ("workers", "device"):
        scorer = Scorer([str(ROOT)], device=device.type, dtype="auto", crop=crop)
        grouped = collate([(None, scorer.preprocess(load_image(path))) for path in files[:8]])[1]
        scorer.submit(grouped)()  # once first: weights and constants go to the GPU once per size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                finish = scorer.submit(grouped)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        finish()
        # the mode's own notice ("a prototype feature ...", once a process) is no wait: run 3 counted it
        caught = [w for w in caught if "prototype feature" not in str(w.message)]
        report[crop] = {"waits": len(caught), "first": str(caught[0].message)[:300] if caught else None}
    return report


def agreement(files, device):
    """The shipped model's scores in every precision against CPU float32: each dtype on `device`
    (auto's choice among them), and on a GPU its views cut by the GPU against cut by the decoding
    workers (the same bytes: only batching differs). `agrees`: every precision within 1e-2 and no
    decision flipped at 0.5, what tests/test_precision.py asks on a CPU."""
    from citytools.devices import pick_dtype
    from citytools.images import load_image
    from citytools.loading import collate
    from citytools.scorer import Scorer

    def scores(where, dtype, crop="auto"):
        scorer = Scorer([str(ROOT)], device=where, dtype=dtype, crop=crop)
        out = []
        for start in range(0, len(files), 8):
            items = [(None, scorer.preprocess(load_image(path))) for path in files[start : start + 8]]
            out += [row["default:Chromatic Aberration"] for row in scorer.score(collate(items)[1])]
        return np.array(out)

    def compare(a, b):
        return {"max_abs_diff": float(np.abs(a - b).max()), "flips_at_0.5": int(((a >= 0.5) != (b >= 0.5)).sum())}

    cpu = scores("cpu", "float32")
    precisions = {dtype: compare(scores(device.type, dtype), cpu) for dtype in ("float32", "bfloat16", "float16")}
    report = {"images": len(files), "device": device.type, "auto": str(pick_dtype("auto", device)).split(".")[1],
              "vs_cpu_float32": precisions}
    if device.type == "cuda":
        report["crop_on_gpu_vs_workers"] = compare(scores(device.type, "auto", "device"), scores(device.type, "auto"))
    report["agrees"] = all(c["max_abs_diff"] <= 1e-2 and c["flips_at_0.5"] == 0 for c in precisions.values())
    return report


def recipe_list(text):
    """"1:fp16,32:fp16" -> [(1, "fp16"), (32, "fp16")]."""
    recipes = []
    for item in text.split(","):
        batch, _, precision = item.partition(":")
        if not batch.strip().isdigit() or precision not in ("fp16", "bf16", "fp32"):
            raise argparse.ArgumentTypeError(f"{item!r}: want BATCH:fp16, BATCH:bf16 or BATCH:fp32")
        recipes.append((int(batch), precision))
    return recipes


def main():
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
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU: checks every path, under 2 minutes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("error: no CUDA device: run this on a GPU machine, or pass --dry-run")
    if args.dry_run:
        args.images, args.raw_batch, args.train_steps, args.head_steps = 12, 8, 4, 20
        args.repeat = min(args.repeat, 2)
    half = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "cores": os.cpu_count(), "torch": torch.__version__, "dry_run": args.dry_run,
              "png_decoder": "libspng" if decoding.pyspng is not None else "pillow"}  # what the workers decode with
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = []

    def measure(name, what, *call):
        """report[name] = what(*call), or {"error": ...}; the JSON is rewritten either way."""
        if name in args.skip:
            return {"skipped": True}
        log(f"{name}: measuring")
        begin = time.perf_counter()
        try:
            report[name] = what(*call)
        except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
            traceback.print_exc()
            report[name] = {"error": f"{type(error).__name__}: {str(error)[-2000:]}"}
            failed.append(name)
        log(f"{name}: {time.perf_counter() - begin:.1f}s {json.dumps(report[name])}")
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return report[name]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log("making data and a random ViT-L/14-336 folder")
        files = make_data(tmp / "data", args.images, args.dry_run)
        model_dir = random_model(tmp / "vit-l", args.dry_run)
        from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

        processor = CityClassifierImageProcessor.from_pretrained(model_dir)
        crops = count_crops(files, processor)
        report["data"] = {"images": len(files), "crops": crops}
        model = CityClassifierForImageClassification.from_pretrained(model_dir)
        raw = measure("raw_backbone_crops_per_s", lambda backbone: {
            str(dtype).split(".")[1]: raw_backbone(backbone, device, dtype, args.raw_batch,
                                                   1 if args.dry_run else args.raw_seconds)
            for dtype in half}, model)
        ceiling = raw.get(str(half[0]).split(".")[1])
        # the smallest batch classify.py hands an idle GPU (citytools.loading.first_batch of 64 images, ~3 views each)
        measure("raw_backbone_small_batch", lambda backbone: {
            "crops": (small := args.raw_batch * 3 // 10),
            "crops_per_s": raw_backbone(backbone, device, half[0], small, 1 if args.dry_run else 2)}, model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        measure("first_calls", in_fresh_python, "first_calls", model_dir, device.type)
        measure("host_waits_per_batch", host_waits, files, device)
        measure("precision_agreement", agreement, files[: min(len(files), 100)], device)

        def ratio(crops_per_s):
            return crops_per_s / ceiling if ceiling else None

        for crop in ("device", "workers"):  # on a CPU (a dry run) too
            measure(f"data_path_crop_{crop}", lambda crop=crop: {
                **(path := data_path(tmp / "data" / "train", model_dir, device, crop)),
                "ratio_to_raw": ratio(path["crops_per_s"])})
        if decoding.pyspng is not None:
            measure("data_path_crop_device_pillow", lambda: {
                **(path := data_path_with_pillow(tmp / "data" / "train", model_dir, device)),
                "ratio_to_raw": ratio(path["crops_per_s"])})

        def classify(*extra, copies=1, root=ROOT):
            folder = tmp / "data" / "train" if copies == 1 else repeated_folder(files, tmp / f"x{copies}", copies)
            seconds, busy, phases = classify_run(folder, model_dir, tmp / "scores.jsonl", device, extra, root)
            return {"crops_per_s": copies * crops / seconds, "images_per_s": copies * len(files) / seconds,
                    "ratio_to_raw": ratio(copies * crops / seconds), "gpu_busy_percent": busy,
                    "options": " ".join(extra), "seconds": seconds, "time": phases}

        runs = [("classify", ())]
        if args.baseline is not None:
            measure("baseline_classify", lambda: {**classify(root=args.baseline), "code": str(args.baseline)})
            runs.insert(0, ("baseline_classify", ()))
        measure("classify", classify)
        if not args.dry_run:  # on a CPU, tests/test_device_crops.py runs classify.py --crop-on device
            measure("classify_crop_on_device", classify, "--crop-on", "device")
        if args.repeat > 1:
            for base, extra in runs:
                one = report.get(base, {})
                if "seconds" not in one:
                    continue  # its one-copy run failed or was left out: no rate to tell from the fixed costs
                root = args.baseline if base.startswith("baseline") else ROOT
                bigger = measure(f"{base}_x{args.repeat}",
                                 lambda extra=extra, root=root: classify(*extra, copies=args.repeat, root=root))
                if "seconds" in bigger:  # the extra copies' crops over the extra seconds
                    extra_s = bigger["seconds"] - one["seconds"]
                    rate = (args.repeat - 1) * crops / extra_s if extra_s > 0 else None
                    bigger.update(marginal_crops_per_s=rate, marginal_ratio_to_raw=ratio(rate) if rate else None,
                                  fixed_s=one["seconds"] - crops / rate if rate else None)
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
        loop = measure("original_loop_images_per_s", original_loop, model_dir, files[: min(len(files), 100)], device,
                       half[0])
        if isinstance(loop, float) and "error" not in report["classify"]:
            report["classify"]["speedup_over_original_loop"] = report["classify"]["images_per_s"] / loop

        def embedding():
            rate, embedded, phases = head_only_embedding(tmp / "data", model_dir, device, half[0])
            return {"crops_per_s": rate, "crops": embedded, "ratio_to_raw": ratio(rate), "time": phases}

        embed = measure("head_only_embedding", embedding)
        if "crops_per_s" in embed:
            # a dry run (a CPU, no autocast) runs fp32 at batch 1 only: the others are the same code (15 s each)
            for batch, precision in [(1, "fp32")] if args.dry_run else args.recipes:
                name = f"head_only_recipe_batch_{batch}" + ("" if precision == "fp16" or args.dry_run else
                                                            f"_{precision}")
                steps = args.head_steps if batch == 1 else args.head_steps // 3
                measure(name, head_only_recipe, tmp / "data", model_dir, tmp / name, device, steps, batch,
                        embed["crops_per_s"], crops / len(files), precision)
        measure("head_steps", head_steps, model_dir, device, max(20, args.head_steps // 2),
                report.get("head_only_recipe_batch_1", {}).get("steps_per_s"))
        measure("full_training_steps_per_s", full_training, tmp / "data", tmp / "run", device, args.train_steps)
    print(json.dumps(report, indent=2))
    log(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
