#!/usr/bin/env python
"""A generated dataset without some of its kinds of image, for ablations: every split of SRC linked
into DST (symbolic links, so no picture is copied) except, in the splits named, the images whose
`effect` is one of those dropped; metadata.csv filtered alike. Training on DST against training on SRC
asks what those images taught, on the same pictures otherwise.

  python bench/filter_dataset.py data/real-seed13 data/real-seed13-nohn --drop-effects jpeg,webp --splits train

Refuses a DST that exists (nothing in SRC is ever written).
"""

import argparse
import os
import sys
from pathlib import Path

import pandas as pd


def split_dirs(src):
    """The dataset's split folders: those holding a metadata.csv."""
    return sorted(p for p in src.iterdir() if (p / "metadata.csv").is_file()) if src.is_dir() else []


def filter_dataset(src, dst, drop, splits):
    """-> {split: (images kept, images dropped)}."""
    counts = {}
    for split_dir in split_dirs(Path(src)):
        meta = pd.read_csv(split_dir / "metadata.csv")
        keep = ~meta["effect"].isin(drop) if split_dir.name in splits else pd.Series(True, index=meta.index)
        out = Path(dst) / split_dir.name
        for name in meta.loc[keep, "file_name"]:
            link = out / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((split_dir / name).resolve(), link)
        meta[keep].to_csv(out / "metadata.csv", index=False)
        counts[split_dir.name] = (int(keep.sum()), int((~keep).sum()))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a make_synthetic_data.py dataset (split folders with metadata.csv)")
    parser.add_argument("dst", type=Path, help="the filtered dataset to create (must not exist)")
    parser.add_argument("--drop-effects", required=True,
                        help="comma-separated `effect` values to leave out, e.g. jpeg,webp")
    parser.add_argument("--splits", default="train",
                        help="comma-separated splits to filter (default: train; the others are linked whole)")
    args = parser.parse_args(argv)
    if args.dst.exists():
        print(f"filter_dataset.py: error: {args.dst}: exists; choose a new folder", file=sys.stderr)
        return 2
    splits = split_dirs(args.src)
    if not splits:
        print(f"filter_dataset.py: error: {args.src}: no split folder with a metadata.csv", file=sys.stderr)
        return 2
    if any("effect" not in pd.read_csv(p / "metadata.csv", nrows=0).columns for p in splits):
        print(f"filter_dataset.py: error: {args.src}: a metadata.csv without an `effect` column", file=sys.stderr)
        return 2
    counts = filter_dataset(args.src, args.dst, set(args.drop_effects.split(",")), set(args.splits.split(",")))
    for split, (kept, dropped) in counts.items():
        print(f"{split}: {kept} images linked, {dropped} left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
