"""The measurements bench/bench_gpu.py makes, one function each (see its docstring for what each
means). Kept apart from its main so that a measurement can run in a fresh Python of its own
(`in_fresh_python`)."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
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
    summary = [line for line in done.stderr.splitlines() if " scored, " in line][-1]  # "N scored, M failed in
    images = int(summary.split()[0]) + int(summary.split()[2])  # Ts (R img/s)": R is read from the brackets
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
    """gpu_measures.`function`(*args) (paths and a device name, given as strings) in a fresh Python: a
    process of its own (a first CUDA call, a decoder left out); -> what it returns, through JSON."""
    code = (("import sys; sys.modules['pyspng'] = None; " if hide_pyspng else "import sys; ") +
            "sys.path[:0] = [sys.argv[1], sys.argv[2]]; import json, torch; from pathlib import Path; "
            "import gpu_measures; args = [torch.device(a) if a in ('cpu', 'cuda') else Path(a) for a in sys.argv[4:]]; "
            "print(json.dumps(getattr(gpu_measures, sys.argv[3])(*args)))")
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


def agreement(files, device, model_dir=ROOT):
    """A model's scores (the shipped one's by default) in every precision against CPU float32: each dtype on `device`
    (auto's choice among them), and on a GPU its views cut by the GPU against cut by the decoding
    workers (the same bytes: only batching differs). `agrees`: every precision within 1e-2 and no
    decision flipped at 0.5, what tests/test_precision.py asks on a CPU."""
    from citytools.devices import pick_dtype
    from citytools.images import load_image
    from citytools.loading import collate
    from citytools.results import score_columns
    from citytools.scorer import Scorer

    def scores(where, dtype, crop="auto"):
        scorer = Scorer([str(model_dir)], device=where, dtype=dtype, crop=crop)
        column = score_columns(scorer.models[0].key, ["Chromatic Aberration"])[0]
        out = []
        for start in range(0, len(files), 8):
            items = [(None, scorer.preprocess(load_image(path))) for path in files[start : start + 8]]
            out += [row[column] for row in scorer.score(collate(items)[1])]
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
