"""bench/bench_gpu.py --dry-run: every path the GPU benchmark measures runs, tiny, on the CPU."""

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_benchmark_dry_run_measures_every_path(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    images, crops = report["data"]["images"], report["data"]["crops"]
    assert images == 12 and images <= crops <= 5 * images and (crops - images) % 4 == 0  # 1 or 5 crops an image
    assert report["raw_backbone_crops_per_s"]["float32"] > 0
    for key in ("data_path_crop_device", "data_path_crop_workers", "classify", "head_only_embedding"):
        assert report[key]["crops_per_s"] > 0 and report[key]["ratio_to_raw"] > 0, report[key]
    assert report["data_path_crop_device"]["crop_mode"] == "device"  # the GPU's road, on the CPU
    assert report["data_path_crop_workers"]["crop_mode"] == "normalised"
    assert report["classify"]["gpu_busy_percent"] is None  # no GPU to sample
    recipe = report["head_only_recipe_batch_1"]
    assert recipe["batch"] == 1 and recipe["steps"] == 20 and recipe["steps_per_s"] > 0
    assert recipe["recipe_3215_images_30k_seen_s_extrapolated"] > 30000 / recipe["steps_per_s"]
    assert report["original_loop_images_per_s"] > 0 and report["full_training_steps_per_s"] > 0
    assert report["gpu_vs_cpu"] == {"images": 12, "max_abs_diff": 0.0, "flips_at_0.5": 0}  # CPU against itself
