"""bench/bench_gpu.py --dry-run: every path the GPU benchmark measures runs, tiny, on the CPU."""

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_benchmark_dry_run_measures_every_path(converted, tmp_path):
    """--models: a model that reads native inputs (stage 13's kind) measured on the same data too."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from bench_classify import with_native_streams
    finally:
        sys.path.remove(str(REPO / "bench"))
    native = with_native_streams(converted["ca"], tmp_path / "native", patch_channels=4, patch_count=8)
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--dry-run", "--out", str(out),
                           "--models", str(native)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    images, crops = report["data"]["images"], report["data"]["crops"]
    assert images == 12 and images <= crops <= 5 * images and (crops - images) % 4 == 0  # 1 or 5 crops an image
    assert report["raw_backbone_crops_per_s"]["float32"] > 0
    assert report["raw_backbone_small_batch"]["crops"] == 2 and report["raw_backbone_small_batch"]["crops_per_s"] > 0
    first = report["first_calls"]  # a fresh process's first backbone calls: what warming up saves
    assert set(first) == {f"{call}_{views}_views_s" for call in ("first", "second") for views in (20, 160)}
    assert all(seconds > 0 for seconds in first.values())
    for key in ("classify", "classify_x2", "head_only_embedding"):  # where the seconds went, as the tools say
        assert "first batch after" in report[key]["time"] and "s in the model" in report[key]["time"], report[key]
    for key in ("data_path_crop_device", "data_path_crop_workers", "classify", "head_only_embedding"):
        assert report[key]["crops_per_s"] > 0 and report[key]["ratio_to_raw"] > 0, report[key]
    assert report["data_path_crop_device"]["crop_mode"] == "device"  # the GPU's road, on the CPU
    assert report["data_path_crop_workers"]["crop_mode"] == "normalised"
    if report["png_decoder"] == "libspng":  # the same path with Pillow decoding, for libspng's share
        pillow = report["data_path_crop_device_pillow"]
        assert pillow["crop_mode"] == "device" and pillow["crops_per_s"] > 0 and pillow["ratio_to_raw"] > 0
    assert report["classify"]["gpu_busy_percent"] is None  # no GPU to sample
    twice = report["classify_x2"]  # the same files twice over (hard links): rate and fixed cost apart
    assert set(twice) >= {"marginal_crops_per_s", "marginal_ratio_to_raw", "fixed_s"}
    recipe = report["head_only_recipe_batch_1"]
    assert recipe["batch"] == 1 and recipe["steps"] == 20 and recipe["steps_per_s"] > 0
    assert recipe["precision"] == "fp32"  # a CPU: no autocast
    steps = report["head_steps"]  # Trainer, HeadOnlyTrainer and the head alone in a plain loop
    assert steps["steps"] == 20 and all(steps[key] > 0 for key in ("trainer", "head_only_trainer", "plain_loop"))
    assert report["original_loop_images_per_s"] > 0 and report["full_training_steps_per_s"] > 0
    precision = report["precision_agreement"]  # every dtype on this CPU against float32
    assert precision["images"] == 12 and precision["auto"] == "float32" and precision["agrees"] is True
    for dtype in ("bfloat16", "float16"):
        assert precision["vs_cpu_float32"][dtype]["max_abs_diff"] <= 1e-2, precision
        assert precision["vs_cpu_float32"][dtype]["flips_at_0.5"] == 0, precision
    assert report["png_decoder"] in ("libspng", "pillow")
    assert report["classify_native"]["images_per_s"] > 0 and "ratio_to_raw" not in report["classify_native"]
    assert report["classify_native"]["model"] == str(native)
    assert report["data_path_crop_workers_native"]["crops_per_s"] > 0
    assert report["precision_agreement_native"]["images"] == 12 and report["precision_agreement_native"]["agrees"]


def test_cpu_benchmark_compares_models_and_grid_tiling(converted, tmp_path):
    """bench/bench_classify.py, tiny: a second model and a second dtype on the same images (in the same
    rounds), and large pictures scored with five crops and with grid tiling, whose crops per megapixel
    follow from their size."""
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_classify.py"), "--model", str(converted["ca"]),
                           "--compare", str(converted["compression"]), "--dtypes", "bfloat16", "--images", "4",
                           "--repeat", "1",
                           "--large-images", "2", "--large-size", "300x200", "--profile", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {run["model"]: run for run in report["runs"]}
    assert set(runs) == {"default", "default-bfloat16", "compare", "large-five", "large-grid"}
    assert runs["default-bfloat16"]["classify"]["args"] == ["--dtype", "bfloat16"]
    assert 0 <= runs["default-bfloat16"]["max_score_change_vs_default"] < 0.1  # the same model, another dtype
    assert runs["compare"]["classify"]["args"] == [] and report["bfloat16_vs_default_img_per_s"] > 0
    assert runs["large-grid"]["classify"]["args"] == ["--tiling-mode", "grid"]
    megapixels = 300 * 200 / 1e6  # the tiny model's tiles are 60 px: 5 x 4 grid tiles, or 5 crops
    assert abs(runs["large-grid"]["crops_per_megapixel"] - 20 / megapixels) < 1e-6
    assert abs(runs["large-five"]["crops_per_megapixel"] - 5 / megapixels) < 1e-6
    assert report["classify_vs_compare"] > 0 and report["grid_vs_five_img_per_s"] > 0
    assert report["machine"]["processor"]
    profile = report["profile"]  # where the time goes, stage by stage: a converted original has no stem
    assert profile["images"] == 3 and 1 <= profile["views_per_image"] <= 5
    stages = profile["ms_per_image"]
    assert set(stages) == {"decode", "views (tiling resize, crops)", "CLIP resize and crop", "normalise", "CLIP tower",
                           "head"}
    assert all(ms > 0 for ms in stages.values()) and abs(sum(stages.values()) - profile["total_ms_per_image"]) < 1e-6


def test_cpu_benchmark_profiles_a_model_that_reads_native_inputs(converted, tmp_path):
    """--native-streams: --model with the native measurement and the patch stream added (stage 7's
    kind, no trained copy needed); --profile times the processor's native measurements and the patch
    stream as stages of their own."""
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_classify.py"), "--model", str(converted["ca"]),
                           "--native-streams", "--patch-channels", "4", "--patch-count", "8", "--images", "2",
                           "--repeat", "1", "--profile", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["models"]["default"] == (f"{converted['ca']} with the native streams added, "
                                           "4 patch channels, 8 patches")
    stages = report["profile"]["ms_per_image"]
    assert {"native measurements", "patch stream", "CLIP tower", "head"} <= set(stages)
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from bench_classify import with_native_streams
    finally:
        sys.path.remove(str(REPO / "bench"))
    built = with_native_streams(converted["ca"], tmp_path / "built", patch_channels=4, patch_count=8)
    config, processor = (json.loads((built / name).read_text()) for name in ("config.json", "preprocessor_config.json"))
    assert config["native_patches"] == processor["native_patches"] == {"count": 8, "size": 32, "channels": 4}
    assert config["native_fringes"] == processor["native_fringes"]
    assert all(ms > 0 for ms in stages.values())


def test_head_step_benchmark_runs_all_three_ways(tmp_path):
    """bench/bench_head_steps.py, tiny: Trainer, HeadOnlyTrainer and the plain loop each take steps,
    and the JSON names the CPU beside the figures."""
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_head_steps.py"), "--backbone", "tiny", "--head", "tiny",
                    "--steps", "20", "--rounds", "1", "--device", "cpu", "--out", str(out)], check=True,
                   capture_output=True)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["cpu"]["processor"] and report["cpu"]["cpus"] >= 1
    assert report["backbone"] == "tiny" and report["head"] == "tiny" and report["steps"] == 20
    assert all(report[key] > 0 for key in ("trainer", "head_only_trainer", "plain_loop"))


def test_batching_simulation_runs_both_ways_and_no_device_beats_its_own_work(tmp_path):
    """bench/simulate_gpu_batching.py, tiny: the real loader feeding a clock-modelled device, whole
    batches and idle hand-over. No run can end before the device has done its own work."""
    out = tmp_path / "sim.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "simulate_gpu_batching.py"), "--images", "8",
                           "--repeat", "1", "--batch-size", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu"] and report["workers"] >= 2 and report["images"] == 8
    assert report["device_alone_s"] > 0
    for mode in ("whole", "idle"):
        run = report[mode]
        assert run["batches"] >= 1 and run["seconds"] >= report["device_alone_s"] and 0 < run["device_busy"] <= 1


def test_stream_ablation_trains_each_stream_and_stacks_it_with_a_model(converted, tmp_path):
    """bench/stream_ablation.py, tiny: each native-resolution stream trained alone on the train
    split, scored on the test split beside the yardstick, and stacked with a CityClassifier."""
    from citytools.cli import make_synthetic_data

    data = tmp_path / "data"
    assert make_synthetic_data.main(["--out", str(data), "--train", "16", "--validation", "8", "--test", "12",
                                     "--seed", "3", "--workers", "1"]) == 0
    out = tmp_path / "ablation"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "stream_ablation.py"), "--dataset", str(data),
                           "--model", str(converted["ca"]), "--streams", "measurements,patches", "--epochs", "1",
                           "--batch", "4", "--processes", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert report["test pictures"] == 12 and report["patches"] == {"count": 32, "size": 32, "channels": 16}
    names = {"measurements", "patches", "model + measurements (stacked)", "model + patches (stacked)"}
    assert names <= set(report["roc_auc"]) and any(name.startswith("model ") for name in report["roc_auc"])
    for figures in [report["yardstick (fringe_px)"], *report["roc_auc"].values()]:
        assert 0.0 <= figures["all"] <= 1.0
    assert "epoch 1/1" in done.stderr and report["machine"]["cpus"] >= 1


def gate_report(folder, candidate, shipped, yardstick, *, dataset, flagged=None, strength=None, auc=0.999):
    """A benchmark.py metrics.json with three models' headline entries: families -> ROC AUC per model."""
    flagged = flagged or {"drawn": 0.0, "painted": 0.0}
    strength = strength or {"0.0": (0.0, 40, 0), "1.0": (0.5, 10, 10), "2.0": (1.0, 10, 10), "4.0": (1.0, 10, 10)}

    def entry(family_auc, clean, headline=True):
        return {"headline": headline, "weights": "x",
                "metrics": {"roc_auc": auc, "ece": 0.03},
                "by": {"family": {**{f: {"n": 20, "positives": 10, "roc_auc": v} for f, v in family_auc.items()},
                                  "sketch": {"n": 5, "positives": 0}},
                       "clean family": {f: {"n": 20, "positives": 0, "flagged": v} for f, v in clean.items()},
                       "strength": {k: {"n": n, "positives": p, "flagged": f} for k, (f, n, p) in strength.items()}}}

    folder.mkdir(parents=True)
    models = {"cand tiling-mean": entry(candidate, flagged), "cand tiling-max": entry(candidate, flagged, False),
              "default tiling-mean": entry(shipped, {"drawn": 0.0, "painted": 0.0}),
              "fringe-baseline": entry(yardstick, {"drawn": 0.0, "painted": 0.0})}
    (folder / "metrics.json").write_text(json.dumps({"dataset": dataset, "images": 80, "threshold": 0.5,
                                                     "models": models}))
    return folder


def ship_gate_module():
    """bench/ship_gate.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship_gate", REPO / "bench" / "ship_gate.py")
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)
    return gate


def run_gate(tmp_path, lossless, delivered, *extra):
    out = tmp_path / "gate.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "ship_gate.py"), "--candidate", "runs/cand",
                           "--lossless", str(lossless), "--delivered", str(delivered), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=60)
    return done, (json.loads(out.read_text()) if out.exists() else None)


def test_ship_gate_applies_issue_27s_release_rule(tmp_path):
    """bench/ship_gate.py: a candidate higher than the shipped model and the yardstick in every family
    ships, and above every target it is done; a perfect score it only matches does not block it; a tie
    below 1 blocks both verdicts; a clean family flagged above 2% or recall under the target leaves it
    shipping but not done; each row says which."""
    good = {"drawn": 0.999, "painted": 1.0}
    lossless = gate_report(tmp_path / "l", good, {"drawn": 0.99, "painted": 1.0}, {"drawn": 0.98, "painted": 0.99},
                           dataset="data/real-check-v")
    delivered = gate_report(tmp_path / "d", good, {"drawn": 0.97, "painted": 0.96}, {"drawn": 0.95, "painted": 0.95},
                            dataset="data/real-check-d")
    done, verdict = run_gate(tmp_path, lossless, delivered)
    assert done.returncode == 0, done.stderr
    assert verdict["ships"] and verdict["done"] and verdict["failed"] == []
    assert verdict["entries"]["lossless"] == "cand tiling-mean"
    level = [r for r in verdict["criteria"] if r["criterion"] == "ROC AUC, painted, against the shipped model"]
    assert [r["note"] for r in level] == ["level at 1", "higher"]  # lossless: both perfect; delivered: higher
    assert not any("sketch" in r["criterion"] for r in verdict["criteria"])  # one label: nothing to rank
    # recall over the positives of 2 px and more: (1.0 * 10 + 1.0 * 10) / 20, the 1 px bucket left out
    recall = [r for r in verdict["criteria"] if r["criterion"].startswith("recall")]
    assert [r["value"] for r in recall] == [1.0, 1.0]
    assert (tmp_path / "gate.md").read_text().startswith("# Issue #27's release rule")
    assert "**Ships** as the new default" in (tmp_path / "gate.md").read_text()

    # higher everywhere, but a clean family at 3%: ships (the release rule), not done
    noisy = tmp_path / "noisy"
    gate_report(noisy, good, {"drawn": 0.99, "painted": 1.0}, {"drawn": 0.98, "painted": 0.99},
                dataset="data/real-check-v", flagged={"drawn": 0.03, "painted": 0.0})
    done, verdict = run_gate(tmp_path, noisy, delivered)
    assert verdict["ships"] and not verdict["done"] and verdict["failed"] == ["lossless: clean drawn flagged"]

    # a tie below 1 (lossless drawn, as stage 15 against stage 5), a clean family at 3%, recall 0.8
    tie = tmp_path / "tie"
    gate_report(tie, {"drawn": 0.996, "painted": 1.0}, {"drawn": 0.996, "painted": 1.0}, {"drawn": 0.9, "painted": 0.9},
                dataset="data/real-check-v", flagged={"drawn": 0.03, "painted": 0.0},
                strength={"1.0": (0.0, 10, 10), "2.0": (0.6, 10, 10), "3.0": (1.0, 10, 10)})
    done, verdict = run_gate(tmp_path, tie, delivered)
    assert done.returncode == 0, done.stderr
    assert not verdict["ships"] and not verdict["done"]
    assert "**Does not ship**: 1 of the 8 rows" in (tmp_path / "gate.md").read_text()
    assert set(verdict["failed"]) == {"lossless: ROC AUC, drawn, against the shipped model",
                                      "lossless: clean drawn flagged",
                                      "lossless: recall at the threshold, fringes >= 2 px"}
    assert [r["value"] for r in verdict["criteria"] if r["criterion"].startswith("recall")][0] == 0.8  # (6 + 10) / 20


def test_ship_gate_says_how_sure_each_comparison_is_over_the_families_sources(tmp_path):
    """Beside each row against another model, the 95% interval of the ROC AUC difference with the
    family's sources drawn again: a candidate that ranks every draw perfectly against a model at
    chance differs by exactly 0.5 in every draw; a candidate scoring as the other differs by 0; a
    family of one source gets no interval. Ties count half in the ROC AUC (worked out by hand)."""
    import csv

    import numpy as np

    gate = ship_gate_module()
    # pairs (positive, negative): 0.9 vs 0.9 half, 0.9 vs 0.1 one, 0.2 vs 0.9 none, 0.2 vs 0.1 one: 2.5 / 4
    assert gate.roc_auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.9, 0.2, 0.1])) == 0.625

    families = {"drawn": 0.999, "painted": 0.999, "photo": 0.999}
    folders = {}
    for kind in ("lossless", "delivered"):
        folders[kind] = gate_report(tmp_path / kind, families, {f: 0.5 for f in families}, {f: 0.5 for f in families},
                                    dataset=f"data/{kind}")
        with (folders[kind] / "scores.csv").open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["path", "label", "family", "source", "cand tiling-mean", "default tiling-mean",
                          "fringe-baseline"])
            for i in range(10):
                for label in (0, 1):
                    out.writerow([f"d{i}{label}", label, "drawn", f"s{i}", label, 0.5, 0.5])  # perfect vs chance
                    out.writerow([f"p{i}{label}", label, "painted", f"s{i}", 0.3 + 0.1 * i, 0.3 + 0.1 * i,
                                  0.3 + 0.1 * i])  # the same scores
                    out.writerow([f"h{i}{label}", label, "photo", "one source", 0.5, 0.5, 0.5])
    done, verdict = run_gate(tmp_path, folders["lossless"], folders["delivered"], "--resamples", "200")
    assert done.returncode == 0, done.stderr
    rows = {(r["report"], r["criterion"]): r for r in verdict["criteria"]}
    drawn = rows[("lossless", "ROC AUC, drawn, against the shipped model")]
    assert drawn["interval"] == [0.5, 0.5] and drawn["sources"] == 10 and "over 10 sources: +0.5000" in drawn["note"]
    assert rows[("delivered", "ROC AUC, painted, against the yardstick")]["interval"] == [0.0, 0.0]
    photo = rows[("lossless", "ROC AUC, photo, against the shipped model")]
    assert "interval" not in photo and "95%" not in photo["note"]
    done, verdict = run_gate(tmp_path, folders["lossless"], folders["delivered"], "--resamples", "0")
    assert not any("interval" in r for r in verdict["criteria"])


def test_ship_gate_says_how_sure_each_share_is_over_its_sources(tmp_path):
    """Beside the clean pictures flagged and the recall, the 95% interval of the share with the sources
    drawn again: 2 of 20 clean pictures flagged, both from one of 10 sources, is k/10 with k ~
    Binomial(10, 0.1) over the draws, whose 2.5th and 97.5th percentiles are 0 and 0.3 (drawing the 20
    pictures instead would give 0.25); a picture without a source is a source of its own; a share of 0
    gets no interval (every draw repeats it)."""
    import csv

    families = {"drawn": 0.999, "painted": 0.999}
    folders = {}
    for kind in ("lossless", "delivered"):
        folders[kind] = gate_report(tmp_path / kind, families, {f: 0.5 for f in families},
                                    {f: 0.5 for f in families}, dataset=f"data/{kind}",
                                    flagged={"drawn": 0.0, "painted": 0.0, "photo": 0.0})
        with (folders[kind] / "scores.csv").open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["path", "label", "family", "clean family", "strength", "source", "cand tiling-mean",
                          "default tiling-mean", "fringe-baseline"])
            for i in range(10):
                for j in range(2):
                    out.writerow([f"c{i}{j}", 0, "drawn", "drawn", 0.0, f"s{i}", 0.9 if i == 0 else 0.1, 0.5, 0.5])
                    out.writerow([f"n{i}{j}", 0, "painted", "painted", 0.0, f"p{i}", 0.1, 0.5, 0.5])
                    out.writerow([f"a{i}{j}", 1, "drawn", "", 2.0 + j, f"s{i}", 0.9 if i % 2 else 0.2, 0.5, 0.5])
                out.writerow([f"h{i}{j}", 0, "photo", "photo", 0.0, f"h{i}", 0.1, 0.5, 0.5])
            for k in range(4):  # generated pictures without a source: each one of its own, none left out
                out.writerow([f"g{k}", 0, "painted", "painted", 0.0, "", 0.9 if k == 0 else 0.1, 0.5, 0.5])
    done, verdict = run_gate(tmp_path, folders["lossless"], folders["delivered"], "--resamples", "2000")
    assert done.returncode == 0, done.stderr
    rows = {(r["report"], r["criterion"]): r for r in verdict["criteria"]}
    drawn = rows[("lossless", "clean drawn flagged")]
    assert drawn["interval"] == [0.0, 0.3] and drawn["sources"] == 10
    assert "of 20; 95% over 10 sources: 0.000 to 0.300" in drawn["note"]
    assert "interval" not in rows[("delivered", "clean photo flagged")]  # none flagged: no interval
    painted = rows[("delivered", "clean painted flagged")]  # 1 of 24 flagged: a picture without a source
    assert painted["sources"] == 14 and painted["interval"][0] == 0.0 and painted["interval"][1] > 0.0
    recall = rows[("lossless", "recall at the threshold, fringes >= 2 px")]  # half the sources found
    low, high = recall["interval"]
    assert recall["sources"] == 10 and 0.0 < low < 0.5 < high < 1.0

    # the forest plot beside the verdict: every row against another model as its difference from the
    # figure it had to beat, every share as itself, each with its interval (or none: a point)
    from PIL import Image

    assert Image.open(tmp_path / "gate.png").size[0] > 500 and "![gate](gate.png)" in (tmp_path / "gate.md").read_text()
    gate = ship_gate_module()
    drawn = gate.plot(verdict, tmp_path / "again.png")
    assert [sum(d[0] == panel for d in drawn) for panel in range(3)] == [8, 6, 2]  # families x models x reports
    by_label = {(d[0], d[1]): d[2:] for d in drawn}
    assert abs(by_label[(0, "lossless: drawn, against the shipped model")][0] - (0.999 - 0.5)) < 1e-9
    assert by_label[(1, "lossless: clean drawn flagged")] == (0.0, 0.0, 0.3)
    assert by_label[(1, "delivered: clean painted flagged")][0] == 0.0  # metrics.json's figure, its interval
    assert by_label[(2, "lossless: recall at the threshold")][1:] == tuple(recall["interval"])


def test_ship_gate_refuses_a_report_it_cannot_judge_in_one_line(tmp_path):
    lossless = gate_report(tmp_path / "l", {"drawn": 1.0}, {"drawn": 1.0}, {"drawn": 1.0}, dataset="x")
    done, verdict = run_gate(tmp_path, lossless, tmp_path / "missing")
    assert done.returncode == 2 and verdict is None
    assert done.stderr.count("\n") == 1 and "missing" in done.stderr and "metrics.json" in done.stderr
    done, _ = run_gate(tmp_path, lossless, lossless, "--shipped", "runs/other")
    assert done.returncode == 2 and "'runs/other'" in done.stderr and done.stderr.count("\n") == 1


def test_filter_dataset_links_all_but_the_dropped_kinds_and_writes_nothing_in_the_source(tmp_path):
    """bench/filter_dataset.py: the filtered splits lose exactly the images of the dropped effects (rows
    and files), the other splits are linked whole, every link reads its source's bytes, the source is
    byte for byte as before, and an existing destination is refused in one line."""
    import hashlib

    src = tmp_path / "src"
    rows = {"train": [("0_jpeg/a.png", "jpeg"), ("0_clean/b.png", "clean"), ("1_shift/c.png", "shift"),
                      ("0_webp/d.png", "webp")],
            "validation": [("0_jpeg/e.png", "jpeg"), ("1_shift/f.png", "shift")]}
    for split, files in rows.items():
        for name, _ in files:
            (src / split / name).parent.mkdir(parents=True, exist_ok=True)
            (src / split / name).write_bytes(f"{split}/{name}".encode())
        lines = ["file_name,label,effect"] + [f"{n},{int(n[0])},{e}" for n, e in files]
        (src / split / "metadata.csv").write_text("\n".join(lines) + "\n")

    def contents(root):
        return sorted(hashlib.sha256(p.read_bytes()).hexdigest() + str(p.relative_to(root))
                      for p in root.rglob("*") if p.is_file())

    before = contents(src)
    dst = tmp_path / "dst"
    script = [sys.executable, str(REPO / "bench" / "filter_dataset.py")]
    done = subprocess.run([*script, str(src), str(dst), "--drop-effects", "jpeg,webp"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train: 2 images linked, 2 left out" in done.stdout
    assert "validation: 2 images linked, 0 left out" in done.stdout
    kept = sorted(p.relative_to(dst / "train").as_posix() for p in (dst / "train").rglob("*.png"))
    assert kept == ["0_clean/b.png", "1_shift/c.png"]
    rows_kept = (dst / "train" / "metadata.csv").read_text().splitlines()[1:]
    assert rows_kept == ["0_clean/b.png,0,clean", "1_shift/c.png,1,shift"]
    assert (dst / "validation" / "0_jpeg" / "e.png").read_bytes() == b"validation/0_jpeg/e.png"  # not filtered
    assert all(p.is_symlink() for p in dst.rglob("*.png"))
    assert contents(src) == before  # nothing written in the source
    again = subprocess.run([*script, str(src), str(dst), "--drop-effects", "jpeg"], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
