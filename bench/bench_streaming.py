#!/usr/bin/env python
"""classify.py's datasets route (streamed webdataset tars and parquet shards) against its folder route,
on the same pictures with the same model, in one run: the route's images/s as a share of the folder's.

The pictures (synthetic illustrations, 768-2048 px PNGs, or --images DIR) are written once as a folder,
as webdataset tars (KEY.png + KEY.json, what img2dataset writes) and as parquet shards (an `image`
{bytes, path} column, what a Hub dataset holds). Each route runs as its own classify.py process with
its defaults, `repeat` times, alternating; the headline is each route's best run. Two figures: the
scoring phase's images/s as classify.py prints it (model loading excluded), and the whole command's
wall time (start-up, opening the dataset, writing the table included). Writes JSON, prints a table.

  python bench/bench_streaming.py                                 # writes bench/streaming.local.json
  python bench/bench_streaming.py --out bench/streaming-epyc.json --images 96 --shards 4
"""

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_classify import machine, make_images, run_measured  # noqa: E402


def write_shards(files, folder, shards):
    """The pictures as webdataset tars and as parquet shards, dealt round `shards` files of each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "wds").mkdir(parents=True)
    (folder / "parquet").mkdir()
    for s in range(shards):
        part = files[s::shards]
        with tarfile.open(folder / "wds" / f"{s:05d}.tar", "w") as tar:
            for path in part:
                key = Path(path).stem
                for name, data in ((f"{key}.png", Path(path).read_bytes()),
                                   (f"{key}.json", json.dumps({"file": Path(path).name}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        rows = [{"image": {"bytes": Path(p).read_bytes(), "path": Path(p).name}} for p in part]
        pq.write_table(pa.Table.from_pylist(rows), folder / "parquet" / f"{s:05d}.parquet")


def run_route(command, out):
    """(scoring images/s as classify.py prints it, wall seconds, peak RSS MB) of one classify.py run."""
    start = time.perf_counter()
    _, err, rss = run_measured([sys.executable, str(ROOT / "classify.py"), *command, "--out", str(out),
                                "--no-resume"])
    wall = time.perf_counter() - start
    summary = [line for line in err.splitlines() if " scored, " in line and " img/s)" in line]
    if not summary:
        raise RuntimeError(f"classify.py {' '.join(command)} printed no summary:\n{err[-3000:]}")
    summary = summary[-1]
    return float(summary.split("(")[1].split(" img/s")[0]), wall, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT), help="the model (default: the shipped one)")
    parser.add_argument("--images", type=int, default=96, help="synthetic pictures to make (default: 96)")
    parser.add_argument("--pictures", type=Path, help="use these PNGs instead (a folder; the first --images)")
    parser.add_argument("--shards", type=int, default=4, help="tars and parquet files (default: 4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each route (default: 3; the best counts)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "streaming.local.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    try:
        if args.pictures:
            chosen = sorted(args.pictures.rglob("*.png"))[: args.images]
            (work / "folder").mkdir()
            files = [str(shutil.copy(p, work / "folder" / f"{i:04d}.png")) for i, p in enumerate(chosen)]
        else:
            files = make_images(work / "folder", args.images, seed=0)
        write_shards(files, work, args.shards)
        common = ["--model", args.model]
        routes = {
            "folder": [str(work / "folder"), *common],
            "webdataset": ["--dataset", "webdataset", "--data-files", str(work / "wds" / "*.tar"), "--streaming",
                           *common],
            "parquet": ["--dataset", "parquet", "--data-files", str(work / "parquet" / "*.parquet"), "--streaming",
                        "--image-column", "image", *common],
        }
        runs = {name: [] for name in routes}
        for _ in range(args.repeat):
            for name, command in routes.items():
                runs[name].append(run_route(command, work / f"{name}.parquet"))
                print(f"{name}: {runs[name][-1][0]:.2f} img/s, {runs[name][-1][1]:.1f} s whole", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {name: (max(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs)) for name, rs in runs.items()}
    result = {"what": "classify.py's datasets route (streamed) against its folder route, same pictures and model",
              "machine": machine(), "images": len(files),
              "model": "default" if Path(args.model).resolve() == ROOT else Path(args.model).name,
              "shards": args.shards, "repeat": args.repeat,
              "routes": {name: {"images_per_s": b[0], "wall_s": b[1], "peak_rss_mb": b[2],
                                "runs": [{"images_per_s": r[0], "wall_s": r[1]} for r in runs[name]],
                                "images_per_s_vs_folder": b[0] / best["folder"][0],
                                "wall_folder_over_route": best["folder"][1] / b[1]}
                         for name, b in best.items()}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| route | images/s (scoring) | x folder | whole command s | folder/route | peak RSS MB |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, entry in result["routes"].items():
        print(f"| {name} | {entry['images_per_s']:.2f} | {entry['images_per_s_vs_folder']:.2f} | {entry['wall_s']:.1f} "
              f"| {entry['wall_folder_over_route']:.2f} | {entry['peak_rss_mb']:.0f} |")
    print(f"{result['machine']['processor']} ({result['machine']['cpus']} CPUs); wrote {args.out}")


if __name__ == "__main__":
    main()
