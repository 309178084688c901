"""Scores image collections for chromatic aberration (or any CityClassifier model) and filters them.

  python classify.py PATH... [--out results.jsonl] [--model M ...] [--label L --min P --copy-to DIR]

PATH is an image file, a folder (scanned recursively for image files, symlinked folders followed,
each real folder once), or @list.txt (one file or folder per line). Every input file gets exactly
one row: its absolute path, size, each model's score per label (`<model>:<label>`), each model's
top label, and `error` (null when fine, else a one-line reason).

Resumable: rows are appended and flushed per batch; running the same command again skips every
file already in the output (a killed run loses at most its in-flight batches). A rerun with another
model, weights, --tiling, --tiling-mode, --combine or --fast-decode is refused (use --no-resume). One process
writes an output at a time. `.jsonl` output is written live; for `.csv` and `.parquet` the rows go
to a hidden `.OUT.jsonl` beside it, and the table is rebuilt from it at the end of each run.

Filtering (after scoring, over all rows of the output, so rerunning only applies it):
  --label "Chromatic Aberration" --min 0.5 --list             print matching paths
  --label default:Pass --max 0.2 --move-to rejected/ --keep-structure
Copies and moves never overwrite and never lose a file, even when killed: rerun the same command
to finish. The destination may lie inside an input folder (it is then not scored).

Several GPUs or hosts: launch the same command with `accelerate launch classify.py ...` or
`torchrun --nproc_per_node N classify.py ...`; each rank scores its share into its own part file,
and rank 0 merges the parts into the output.

A `datasets` dataset instead of files, streamed (nothing downloaded whole), one row per sample keyed
so that it joins back (README "Hub-scale datasets"); resume, torchrun and bad samples as for files:
  python classify.py --dataset HUB_ID --split train --streaming --out scores.parquet
  python classify.py --dataset webdataset --data-files 'shards/*.tar' --streaming --out scores.parquet
  python classify.py --dataset parquet --data-files 'data/*.parquet' --image-column image --out scores.parquet

Exit status: 0 when every file in the output is scored, 1 when some could not be (they have error
rows, from this run or an earlier one) or could not be copied/moved, 2 for bad arguments or an
output that cannot be written.
"""

import argparse
from pathlib import Path

from citytools.tiling import TILE_COMBINES, TILING_MODES
from citytools.toolkit import DTYPES, MAX_PIXELS, ROOT, PixelLimit, finite_float, non_negative_int, positive_int

DEFAULT_MODEL = str(ROOT)


def max_pixels(text):
    return PixelLimit(positive_int(text), "--max-pixels")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders, or @list.txt files")
    parser.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="M",
                        help="model folders or Hub ids (default: the shipped model at the repo root); models "
                             "sharing backbone weights share one backbone pass")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"),
                        help="output file: .jsonl, .csv or .parquet (default: results.jsonl)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per batch (default: 8 on a CPU; on a GPU as many as fit in half its free memory "
                             "by an estimate from the model, 8 to 64)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="decoding processes (default: half the cores on a CPU, the model's threads get the "
                             "rest; cores - 1 feeding a GPU); 0 decodes in the main process")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N (default: auto: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for the model (default: all cores for models over 50M parameters, which "
                             "are compute-bound; otherwise the cores the decoding workers leave free, at least 1)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: float16 on CUDA, float32 on a CPU (the stem and head stay float32 in every dtype)")
    parser.add_argument("--crop-on", choices=["auto", "workers", "device"], default="auto",
                        help="where images are resized and cut into views: workers (auto), or device: the GPU "
                             "does it and the decoding workers only decode (the same bytes as Pillow's resize; "
                             "try it where the CPUs cannot keep a GPU busy)")
    parser.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=None,
                        help="five-crop tiling of large images (default: as each model's processor says)")
    parser.add_argument("--tiling-mode", choices=TILING_MODES,
                        help="five: the original's five crops after shrinking to a 1536 px short side; grid: crops "
                             "covering the whole picture at native resolution (up to the processor's "
                             "grid_max_tiles, 48 by default), for multi-megapixel pictures with small fringes; "
                             "slower on them (default: as each model's processor says)")
    parser.add_argument("--combine", choices=TILE_COMBINES,
                        help="how tile scores combine (default: as each model's config says)")
    parser.add_argument("--max-pixels", type=max_pixels, default=PixelLimit(MAX_PIXELS, "--max-pixels"),
                        help="give an error row to images with more pixels, or whose scoring would make a larger "
                             f"image (a 10000x3 strip is resized to 1120000x336) (default: {MAX_PIXELS}, twice "
                             "Pillow's warning limit)")
    parser.add_argument("--no-resume", action="store_true", help="start the output afresh instead of resuming")
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode large JPEGs at a reduced scale when the scoring downsizes them anyway "
                             "(not bit-exact: scores moved by up to 0.04 with tiling and 0.2 without in the README's "
                             "measurement; a first pass, not for tight thresholds)")
    filters = parser.add_argument_group("filtering")
    filters.add_argument("--label", help="score column to filter on: a label name, or MODEL:LABEL")
    filters.add_argument("--min", type=finite_float, help="keep rows with score >= MIN (default 0.5 when only --label)")
    filters.add_argument("--max", type=finite_float, help="keep rows with score <= MAX")
    filters.add_argument("--list", action="store_true", help="print the matching paths")
    filters.add_argument("--copy-to", type=Path, metavar="DIR",
                         help="copy matching files here (never overwrites: a taken name gets _1, _2, ...; a file "
                              "changed since it was scored is left out with an error line)")
    filters.add_argument("--move-to", type=Path, metavar="DIR",
                         help="move matching files here (never overwrites; the source is removed only once its "
                              "copy is in place; a killed move is finished by rerunning; a file changed since it "
                              "was scored stays, with an error line)")
    filters.add_argument("--keep-structure", action="store_true",
                         help="mirror the source folders under DIR (default: flat)")
    data = parser.add_argument_group("datasets route")
    data.add_argument("--dataset", metavar="NAME",
                      help="instead of PATHs: a Hub dataset id, a local dataset folder, or a `datasets` builder "
                           "(webdataset, parquet, imagefolder) with --data-files")
    data.add_argument("--data-files", nargs="+", metavar="GLOB",
                      help="the files of --split, as `datasets` takes them (local globs, or hf:// paths)")
    data.add_argument("--dataset-config", metavar="CONFIG", help="its configuration (subset), when it has several")
    data.add_argument("--split", default="train", help="its split (default: train)")
    data.add_argument("--streaming", action="store_true",
                      help="read the samples as a stream, never downloading the dataset whole: what --dataset "
                           "always does (the flag says so in commands and scripts)")
    data.add_argument("--image-column", default=None,
                      help="its image column: Image, {bytes, path}, bytes or a path (default: `image`, else "
                           "every Image column: a webdataset's jpg/png/webp, a sample's first present one)")
    data.add_argument("--id-column",
                      help="a column whose values name the samples: the output's key (default: a webdataset's "
                           "__key__ within its tar, else the data file and row)")
    data.add_argument("--push-to-hub", metavar="REPO",
                      help="upload the scores as a Hub dataset REPO (keys and scores, a card saying how to join)")
    data.add_argument("--private", action="store_true", help="with --push-to-hub: create REPO private")
    args = parser.parse_args(argv)
    if bool(args.paths) == bool(args.dataset):
        parser.error("give PATHs or --dataset (one of them)")
    if args.copy_to and args.move_to:
        parser.error("--copy-to and --move-to exclude each other")
    if (args.list or args.copy_to or args.move_to or args.min is not None or args.max is not None) and not args.label:
        parser.error("filtering needs --label")
    if args.dataset and (args.label or args.keep_structure):
        parser.error("with --dataset the output holds the samples' keys and scores; --label, --list, --copy-to and "
                     "--move-to filter files (PATHs): join the scores to the dataset and filter it with "
                     "Dataset.filter (README, Hub-scale datasets)")
    for flag in ("data_files", "id_column", "push_to_hub", "image_column", "dataset_config"):
        if getattr(args, flag) and not args.dataset:
            parser.error(f"--{flag.replace('_', '-')} goes with --dataset")
    if args.fast_decode and args.dataset:
        parser.error("--fast-decode decodes files (PATHs) at a reduced scale; a dataset's samples are decoded whole")
    if args.private and not args.push_to_hub:
        parser.error("--private goes with --push-to-hub")
    if args.push_to_hub and args.out.suffix != ".parquet":
        parser.error("--push-to-hub uploads a .parquet --out")
    if args.label and args.min is None and args.max is None:
        args.min = 0.5
    if args.min is not None and args.max is not None and args.min > args.max:
        parser.error(f"--min {args.min} is above --max {args.max}: no score can match")
    if args.out.suffix not in (".jsonl", ".csv", ".parquet"):
        parser.error(f"--out {args.out}: use a .jsonl, .csv or .parquet file")
    return args
