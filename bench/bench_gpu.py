#!/usr/bin/env python
"""GPU throughput of every path that should keep a GPU busy, in one run, as figures and JSON.

It makes its own data (make_synthetic_data.py) and its own random ViT-L/14-336-sized model folder
(nothing from the Hub), then measures:
- the raw backbone's crops/s (fp16 and bf16, sdpa, `--raw-batch` crops a call): the ceiling;
- classify.py's crops/s with its defaults, and its ratio to the raw fp16 figure;
- the original's one-image loop (open, convert, processor, model), img/s in fp16;
- head-only training's embedding pass (train_hf.embed_all), crops/s and ratio to the raw figure;
- full-mode training steps/s with the shipped model's config (configs/default_model.json);
- the shipped model's scores on the GPU (fp16) against the CPU (float32): largest difference and
  decisions flipped at 0.5.
A crop is one 336 px view through the backbone: five for a tiled image, one otherwise.

  python bench/bench_gpu.py --out bench/gpu.json            # on a CUDA machine, about 5 minutes
  python bench/bench_gpu.py --dry-run --out /tmp/gpu.json   # the same code paths, tiny, on a CPU

--dry-run uses a tiny CLIP, a dozen small images and a few steps, in float32 on the CPU: it checks
that every path runs (a test runs it), and its figures mean nothing.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

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
    from transformers import CLIPVisionConfig

    from remote_code import CityClassifierConfig, CityClassifierForImageClassification, CityClassifierImageProcessor

    if dry_run:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=30, patch_size=6, projection_dim=16)
        processor = CityClassifierImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
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


def classify_run(data, model_dir, out, device, extra=()):
    """(seconds of scoring, as classify.py reports them, its stderr)."""
    command = [sys.executable, str(ROOT / "classify.py"), str(data), "--model", str(model_dir), "--out", str(out),
               "--no-resume", "--device", device, *extra]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"classify.py failed:\n{done.stderr[-3000:]}")
    summary = [line for line in done.stderr.splitlines() if " scored, " in line][-1]
    return float(summary.split(" in ")[1].split("s ")[0]), done.stderr


def original_loop(model_dir, files, device, dtype):
    """Img/s of the original's folder loop: one image at a time, opened, converted, processed, scored."""
    from PIL import Image

    from remote_code import CityClassifierForImageClassification, CityClassifierImageProcessor

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
    """(crops/s, crops) of train_hf's embedding pass for head-only training over the train split."""
    import train_hf
    from remote_code import CityClassifierForImageClassification, CityClassifierImageProcessor
    from scoring import default_batch_size, default_workers

    model = CityClassifierForImageClassification.from_pretrained(model_dir).eval()
    processor = CityClassifierImageProcessor.from_pretrained(model_dir)
    split = train_hf.load_splits(train_hf.DataArguments(dataset_name=str(data), eval_split=None))["train"]
    batch = default_batch_size(device, model)
    start = time.perf_counter()
    embeds, mask = train_hf.embed_all(split, model, processor, batch, device, dtype, default_workers(device))
    seconds = time.perf_counter() - start
    assert np.isfinite(embeds).all()
    return int(mask.sum()) / seconds, int(mask.sum())


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
    config_file = Path(out).with_suffix(".json")
    config_file.write_text(json.dumps(args))
    done = subprocess.run([sys.executable, str(ROOT / "train_hf.py"), str(config_file)], env=ENV,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train_hf.py failed:\n{done.stderr[-3000:]}")
    import csv

    with open(Path(out) / "loss.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train_steps_per_second")]
    return float(rows[-1]["train_steps_per_second"])


def agreement(files, device):
    """The shipped model's scores, GPU in its auto dtype against CPU float32."""
    from scoring import Scorer, collate, load_image

    def scores(where, dtype):
        scorer = Scorer([str(ROOT)], device=where, dtype=dtype)
        out = []
        for start in range(0, len(files), 8):
            items = [(None, scorer.preprocess(load_image(path))) for path in files[start : start + 8]]
            out += [row["default:Chromatic Aberration"] for row in scorer.score(collate(items)[1])]
        return np.array(out)

    cpu = scores("cpu", "float32")
    gpu = scores(device.type, "auto")
    return {"images": len(files), "max_abs_diff": float(np.abs(gpu - cpu).max()),
            "flips_at_0.5": int(((gpu >= 0.5) != (cpu >= 0.5)).sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu.local.json", help="JSON to write")
    parser.add_argument("--images", type=int, default=600, help="synthetic images (default: 600)")
    parser.add_argument("--raw-batch", type=int, default=160, help="crops per raw backbone call (default: 160)")
    parser.add_argument("--train-steps", type=int, default=200, help="full-mode training steps (default: 200)")
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU: checks every path, under 2 minutes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("error: no CUDA device: run this on a GPU machine, or pass --dry-run")
    if args.dry_run:
        args.images, args.raw_batch, args.train_steps = 12, 8, 4
    half = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "cores": os.cpu_count(), "torch": torch.__version__, "dry_run": args.dry_run}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log("making data and a random ViT-L/14-336 folder")
        files = make_data(tmp / "data", args.images, args.dry_run)
        model_dir = random_model(tmp / "vit-l", args.dry_run)
        from remote_code import CityClassifierForImageClassification, CityClassifierImageProcessor

        processor = CityClassifierImageProcessor.from_pretrained(model_dir)
        crops = count_crops(files, processor)
        report["data"] = {"images": len(files), "crops": crops}
        log("raw backbone")
        model = CityClassifierForImageClassification.from_pretrained(model_dir)
        raw = {str(dtype).split(".")[1]: raw_backbone(model, device, dtype, args.raw_batch, 3 if args.dry_run else 15)
               for dtype in half}
        report["raw_backbone_crops_per_s"] = raw
        ceiling = raw[str(half[0]).split(".")[1]]
        del model
        log("classify.py")
        seconds, _ = classify_run(tmp / "data" / "train", model_dir, tmp / "scores.jsonl", device.type)
        report["classify"] = {"crops_per_s": crops / seconds, "images_per_s": len(files) / seconds,
                              "ratio_to_raw": crops / seconds / ceiling}
        log("the original's one-image loop")
        report["original_loop_images_per_s"] = original_loop(model_dir, files[: min(len(files), 100)], device,
                                                             half[0])
        report["classify"]["speedup_over_original_loop"] = report["classify"]["images_per_s"] / \
            report["original_loop_images_per_s"]
        log("head-only embedding pass")
        rate, embedded = head_only_embedding(tmp / "data", model_dir, device, half[0])
        report["head_only_embedding"] = {"crops_per_s": rate, "crops": embedded, "ratio_to_raw": rate / ceiling}
        log("full-mode training, shipped config")
        report["full_training_steps_per_s"] = full_training(tmp / "data", tmp / "run", device, args.train_steps)
        log("GPU against CPU scores, shipped model")
        report["gpu_vs_cpu"] = agreement(files[: min(len(files), 200)], device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
