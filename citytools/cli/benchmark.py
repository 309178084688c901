"""Benchmarks CityClassifier models on a labelled image set, with `evaluate`, next to a classical
(non-learned) fringe detector, and writes metrics.json, report.md and plots.

  python benchmark.py --model . --dataset data/synthetic --split test --out bench/synthetic-test
  python benchmark.py --model . models/ca-v1.16 --dataset data/real --split test --out report --update-card .

The dataset is an image folder whose label folders follow the original's naming (`0_pass/`,
`1_aberration/`: the number before the first underscore is the label id), with an optional
metadata.csv (file_name plus columns such as effect, strength, source: metrics are broken down by
each), or a Hub dataset id with a `label` column.

For every model it scores all images once with tiling and combines the tiles with each strategy
(mean, median, max, min), and once without tiling; the model's own strategy is the headline.
`--passes tiling,grid` adds grid tiling (every part of a large picture at native resolution) and
leaves the pass without tiling out.
Thresholds: the scores are cut at --threshold, and the report also gives the lowest threshold whose
precision reaches --target-precision, since users filter datasets by threshold.
"""

import argparse
import csv
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from citytools.cards import BASELINE, dataset_id, load_card, update_card
from citytools.plots import plots, sort_key
from citytools.tiling import TILE_COMBINES
from citytools.toolkit import (
    DTYPES,
    EXIT_OK,
    EXIT_SOME_FAILED,
    ROOT,
    UsageError,
    fraction,
    label_from_folder,
    load_dataset,
    non_negative_int,
    positive_int,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[str(ROOT)], help="model folders or Hub ids (default: shipped)")
    parser.add_argument("--dataset", required=True, help="image folder (with split subfolders) or Hub dataset id")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, report.md and plots")
    parser.add_argument("--threshold", type=fraction, default=0.5, help="score cut for the positive label (0.5)")
    parser.add_argument("--target-precision", type=fraction, default=0.95, help="report the threshold reaching it")
    parser.add_argument("--max-images", type=positive_int, help="evaluate a random subset of this size")
    parser.add_argument("--no-baseline", action="store_true", help="skip the classical fringe baseline")
    parser.add_argument("--passes", type=passes_list, default=["tiling", "no-tiling"],
                        help="comma-separated scoring passes: tiling (the model's saved tiling, each tile strategy), "
                             "no-tiling, grid (grid tiling at native resolution, each strategy) "
                             "(default: tiling,no-tiling)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="decoding processes (default: as classify.py: half the cores on a CPU, the model's "
                             "threads get the rest; cores - 1 feeding a GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="model dtype (default: float32, the reference numbers)")
    parser.add_argument("--update-card", type=Path, metavar="MODEL_DIR",
                        help="write the headline metrics into MODEL_DIR/README.md as a model-index block (refused "
                             "when the card reports another dataset or split, unless --force)")
    parser.add_argument("--force", action="store_true", help="with --update-card: replace another dataset's results, "
                        "or publish figures although some images could not be scored")
    return parser.parse_args(argv)


def passes_list(text):
    passes = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(passes) - {"tiling", "no-tiling", "grid"})
    if unknown or not passes:
        raise argparse.ArgumentTypeError(f"unknown pass(es) {', '.join(unknown) or '(none)'}: "
                                         "choose from tiling, no-tiling, grid")
    return list(dict.fromkeys(passes))


# -------------------------------------------------------------------------------------------- data


def load_records(dataset, split, max_images=None):
    """[{"path" or "image", "label", **metadata}] for a local image folder split or a Hub dataset."""
    local = Path(dataset) / split
    if Path(dataset).is_dir():
        if not local.is_dir():
            raise UsageError(f"{dataset}: no split folder {split!r}")
        from citytools.discovery import walk

        metadata = {}
        if (local / "metadata.csv").is_file():
            with open(local / "metadata.csv", newline="") as f:
                metadata = {row.pop("file_name"): row for row in csv.DictReader(f)}
        records = []
        for path in walk(str(local), notice=lambda text: print(f"note: {text}", file=sys.stderr)):
            relative = Path(path).relative_to(local.absolute()).as_posix()
            meta = dict(metadata.get(relative, {}))
            label = label_from_folder(Path(path).parent.name)
            label = label if label is not None else meta.get("label")
            if label is None:
                raise UsageError(f"{path}: no label (put it in a folder named like 0_pass/ or 1_aberration/)")
            meta.pop("label", None)
            records.append({"path": path, "label": int(label), **meta})
    else:
        ds = load_dataset(dataset, split=split)
        if "label" not in ds.column_names:
            raise UsageError(f"{dataset}: no 'label' column (has {', '.join(ds.column_names)})")
        scalar = [c for c, f in ds.features.items() if c not in ("image", "label") and hasattr(f, "dtype")]
        records = [{"image": row["image"], "label": int(row["label"]), **{c: row[c] for c in scalar}} for row in ds]
    if not records:
        raise UsageError(f"{dataset}: split {split!r} holds no images")
    if max_images and len(records) > max_images:
        keep = np.random.default_rng(0).choice(len(records), max_images, replace=False)
        records = [records[i] for i in sorted(keep)]
    return [derive_columns(record) for record in records]


NOT_BREAKDOWNS = ("path", "image", "label", "negative_blur")  # negative_blur's breakdown: `clean, blurred`
MAX_BREAKDOWN_VALUES = 40  # a metadata column with more distinct values (file names, pixel sizes) is not a breakdown
MEGAPIXEL_BUCKETS = ((1.0, "under 1 MP"), (4.0, "1-4 MP"), (float("inf"), "4 MP and more"))
# small pictures apart: under 1 MP holds most test pictures, and the native streams see least in the smallest
LONG_SIDE_BUCKETS = ((256, "under 256 px"), (512, "256-511 px"), (1024, "512-1023 px"),
                     (float("inf"), "1024 px and more"))


def derive_columns(record):
    """Adds breakdowns made of metadata columns: `megapixels` and `long side` (size buckets, from width
    and height),
    `clean family` (the picture family of clean images only: their false-positive rate per family),
    `clean, blurred` (clean images blurred by make_synthetic_data --blurred-negatives or not),
    `shift strength` (the strength of plain channel shifts only) and `strength, 4 MP and more` (the
    aberration strength of the largest pictures only)."""
    try:
        width, height = float(record["width"]), float(record["height"])
        record["megapixels"] = next(name for limit, name in MEGAPIXEL_BUCKETS if width * height / 1e6 < limit)
        record["long side"] = next(name for limit, name in LONG_SIDE_BUCKETS if max(width, height) < limit)
    except (KeyError, TypeError, ValueError):
        pass
    if record.get("effect") == "clean" and record.get("family"):
        record["clean family"] = record["family"]
    if record.get("effect") == "clean" and record.get("negative_blur") not in (None, ""):
        record["clean, blurred"] = "blurred" if float(record["negative_blur"]) > 0 else "sharp"
    if record.get("effect") == "shift" and record.get("strength") not in (None, ""):
        record["shift strength"] = record["strength"]  # the plain channel shift alone, by strength
    if record.get("megapixels") == MEGAPIXEL_BUCKETS[-1][1] and record.get("strength") not in (None, "", "0.0"):
        record["strength, 4 MP and more"] = record["strength"]  # where the 1536 px rule shrinks fringes most
    return record


def batches(records, scorer, args, tiling):
    """Yields (record indices, grouped inputs, {index: error}) with decoding in worker processes for
    files; an image that cannot be scored is reported, not fatal."""
    from citytools.loading import FileStream, loader_batches, preprocess_each

    if "path" in records[0]:
        index = {r["path"]: i for i, r in enumerate(records)}
        stream = FileStream([r["path"] for r in records], scorer, np.array([], dtype=np.int64), 0, 1, None,
                            tiling=tiling)
        for metas, grouped in loader_batches(stream, args.batch_size, args.workers, scorer.device):
            errors = {index[m["path"]]: m["error"] for m in metas if m["error"]}
            yield [index[m["path"]] for m in metas if not m["error"]], grouped, errors
    else:
        for start in range(0, len(records), args.batch_size):
            good, grouped, errors = preprocess_each(records[start : start + args.batch_size],
                                                    lambda record: scorer.preprocess(record["image"], tiling=tiling))
            yield [start + i for i in good], grouped, {start + i: error for i, error in errors.items()}


def load_scorer(name, args, **options):
    """A Scorer for one model; a model that cannot be loaded (no weights, not all of them, no such
    folder) is a UsageError in one line."""
    from citytools.scorer import Scorer

    try:
        return Scorer([name], device=args.device, dtype=args.dtype, **options)
    except ValueError as error:
        raise UsageError(str(error)) from None


def model_scores(scorer, name, records, args):
    """(key, default variant, {variant: {record index: scores}}, {record index: error}) for one model:
    each tile strategy from one tiled pass, and one pass without tiling. The default variant is what
    the saved settings give."""
    import torch  # here, not at the top: --help and bad arguments answer without it (seconds to import)
    from tqdm import tqdm

    from citytools.devices import default_workers, model_threads
    from citytools.remote import combine_tiles

    model = scorer.models[0].model
    if args.workers is None:
        args.workers = default_workers(scorer.device)
    if scorer.device.type == "cpu":
        torch.set_num_threads(model_threads(model.num_parameters(), args.workers))
    tiles_ok = model.config.arch == "class"  # score models never tile
    default = f"tiling-{scorer.models[0].combine}" if scorer.models[0].tiling and tiles_ok else "no-tiling"
    results, failed = {}, {}
    passes = [p for p in args.passes if tiles_ok or p == "no-tiling"] or ["no-tiling"]
    for name_of_pass in passes:
        tiling = name_of_pass != "no-tiling"
        if name_of_pass == "grid":
            scorer = load_scorer(name, args, tiling_mode="grid")
        bar = tqdm(total=len(records), unit="img", desc=f"{scorer.models[0].key} {name_of_pass}")
        for indices, grouped, errors in batches(records, scorer, args, tiling):
            bar.update(len(indices) + len(errors))  # decoding workers send partial batches: count images
            for i, error in errors.items():
                if i not in failed:
                    tqdm.write(f"error: {records[i].get('path', f'row {i}')}: {error} (left out)", file=sys.stderr)
                failed[i] = error
            if grouped is None:
                continue
            for _, output, mask in scorer.outputs(grouped):
                tiles, mask = output.tile_scores.float().cpu(), mask.cpu()
                for strategy in (TILE_COMBINES if tiling else ("mean",)):
                    variant = f"{name_of_pass}-{strategy}" if tiling else "no-tiling"
                    combined = combine_tiles(tiles, mask, strategy).numpy()
                    results.setdefault(variant, {}).update(zip(indices, combined))
        bar.close()
    if default not in results:  # its pass was not asked for
        default = next(iter(results), default)
    return scorer.models[0].key, default, results, failed


def baseline_job(record):
    from citytools.baseline import FringeBaseline
    from citytools.images import load_image

    image = load_image(record["path"]) if "path" in record else record["image"]
    p = FringeBaseline()(image)
    return [p["Pass"], p["Chromatic Aberration"]]


def baseline_scores(records, processes):
    from tqdm import tqdm

    with Pool(processes) as pool:
        rows = list(tqdm(pool.imap(baseline_job, records, chunksize=4), total=len(records), desc=BASELINE,
                         unit="img"))
    return np.array(rows)


# ----------------------------------------------------------------------------------------- metrics


def classification_metrics(scores, labels, threshold, target_precision):
    import evaluate
    from sklearn.metrics import precision_recall_curve

    metric = evaluate.load(str(ROOT / "metrics" / "classification"))
    binary = scores.shape[1] == 2
    predictions = (scores[:, 1] >= threshold).astype(int) if binary else scores.argmax(1)
    result = metric.compute(predictions=predictions, references=labels, scores=scores)
    result["threshold"] = threshold if binary else None
    if binary and len(np.unique(labels)) > 1:
        precision, recall, thresholds = precision_recall_curve(labels, scores[:, 1])
        reaching = np.flatnonzero(precision[:-1] >= target_precision)
        result["target_precision"] = target_precision
        result["threshold_at_target_precision"] = float(thresholds[reaching[0]]) if len(reaching) else None
        result["recall_at_target_precision"] = float(recall[reaching[0]]) if len(reaching) else None
        negatives = labels == 0
        result["false_positive_rate"] = float(predictions[negatives].mean()) if negatives.any() else None
    return result


def breakdown(records, scores, labels, threshold, column):
    """Per value of a metadata column: count, share flagged positive, accuracy (and ROC AUC). Images
    without the column (e.g. `clean family` of aberrated ones) are in no row."""
    from sklearn.metrics import roc_auc_score

    groups = {}
    for i, record in enumerate(records):
        if column in record:
            groups.setdefault(str(record[column]), []).append(i)
    flagged = scores[:, 1] >= threshold
    rows = {}
    for value, idx in sorted(groups.items(), key=lambda kv: sort_key(kv[0])):
        idx = np.array(idx)
        y = labels[idx]
        row = {"n": int(len(idx)), "positives": int(y.sum()), "flagged": float(flagged[idx].mean()),
               "accuracy": float((flagged[idx] == (y == 1)).mean())}
        if 0 < y.sum() < len(y):
            row["roc_auc"] = float(roc_auc_score(y, scores[idx, 1]))
        rows[value] = row
    return rows


def write_scores(path, records, headline):
    """scores.csv: per image, its path, label and metadata, and each headline variant's positive score,
    for breakdowns the report does not make."""
    columns = sorted({k for r in records for k in r if k not in ("path", "image", "label")})
    names = [name for name, r in headline.items() if r["binary"]]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *columns, *names])
        for i, record in enumerate(records):
            writer.writerow([record.get("path", f"row {i}"), record["label"], *(record.get(c, "") for c in columns),
                             *(f"{headline[name]['scores'][i, 1]:.6f}" for name in names)])


def report_md(results, args, n, written, skipped=()):
    lines = [f"# Benchmark: {args.dataset} ({args.split}, {n} images scored)", "",
             f"Threshold {args.threshold}; target precision {args.target_precision}.", ""]
    if skipped:
        lines += [f"**{len(skipped)} image(s) could not be scored and are left out of every figure:**", ""]
        lines += [f"- `{s['path']}`: {s['error']}" for s in skipped] + [""]
    lines += ["| model / variant | ROC AUC | PR AUC | accuracy | precision | recall | F1 | FPR | ECE | "
              f"threshold for P>={args.target_precision} (recall) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    for name, r in results.items():
        m = r["metrics"]
        target = m.get("threshold_at_target_precision")
        target = f"{target:.3f} ({m['recall_at_target_precision']:.3f})" if target is not None else "not reached"
        lines.append(f"| {name} | {fmt(m.get('roc_auc'))} | {fmt(m.get('pr_auc'))} | {fmt(m['accuracy'])} | "
                     f"{fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['f1'])} | "
                     f"{fmt(m.get('false_positive_rate'))} | {fmt(m.get('ece'))} | {target} |")
    headline = [name for name, r in results.items() if r["headline"]]
    for column in sorted({c for r in results.values() for c in r["by"]}):
        values = results[headline[0]]["by"][column]
        if not any("roc_auc" in row for row in values.values()):
            continue
        lines += ["", f"## ROC AUC by {column}", "",
                  "| " + column + " | n | positives | " + " | ".join(headline) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in headline) + " |"]
        for value, row in values.items():
            if "roc_auc" in row:
                cells = " | ".join(fmt(results[h]["by"][column][value].get("roc_auc")) for h in headline)
                lines.append(f"| {value} | {row['n']} | {row['positives']} | {cells} |")
    for column in sorted({c for r in results.values() for c in r["by"]}):
        lines += ["", f"## By {column}", "", "share flagged (recall for label 1, false-positive rate for label 0)", "",
                  "| " + column + " | label | n | " + " | ".join(headline) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in headline) + " |"]
        values = results[headline[0]]["by"][column]
        for value, row in values.items():
            label = "1" if row["positives"] == row["n"] else "0" if row["positives"] == 0 else "mixed"
            cells = " | ".join(f"{results[h]['by'][column][value]['flagged']:.3f}" for h in headline)
            lines.append(f"| {value} | {label} | {row['n']} | {cells} |")
    lines += [""] + [f"![{name}]({name})" for name in written]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # refused before hours of scoring, as the card below
        raise UsageError(f"--out {args.out}: is a file, not a folder")
    if args.update_card:
        load_card(args.update_card, dataset_id({"dataset": args.dataset, "local": Path(args.dataset).is_dir()}),
                  args.split, args.force)
    records = load_records(args.dataset, args.split, args.max_images)
    scorers = [load_scorer(name, args) for name in args.model]  # every model loads before any scores
    scored, failed, weights = [], {}, {}
    for name, scorer in zip(args.model, scorers):
        key, default, variants, errors = model_scores(scorer, name, records, args)
        scored.append((key, default, variants))
        weights[key] = scorer.models[0].weights
        failed.update(errors)
    keep = [i for i in range(len(records)) if i not in failed]  # every model is judged on the same images
    if not keep:
        raise UsageError(f"{args.dataset}: no image of split {args.split!r} could be scored")
    skipped = [{"path": records[i].get("path", f"row {i}"), "error": failed[i]} for i in sorted(failed)]
    records = [records[i] for i in keep]
    labels = np.array([r["label"] for r in records])
    results = {}
    for key, default, variants in scored:
        for variant, rows in variants.items():
            scores = np.stack([rows[i] for i in keep])
            grid = default.replace("tiling-", "grid-", 1)  # the same combination over grid tiles, when asked for
            results[f"{key} {variant}"] = {"scores": scores, "binary": scores.shape[1] == 2,
                                           "headline": variant in (default, grid), "weights": weights[key]}
    if not args.no_baseline and all(r["binary"] for r in results.values()):
        results[BASELINE] = {"scores": baseline_scores(records, os.cpu_count() or 1), "binary": True,
                             "headline": True}
    metadata_columns = sorted(c for c in {k for r in records for k in r if k not in NOT_BREAKDOWNS}
                              if len({str(r.get(c)) for r in records}) <= MAX_BREAKDOWN_VALUES)
    for r in results.values():
        if r["scores"].shape[1] == 1:
            import evaluate

            metric = evaluate.load(str(ROOT / "metrics" / "regression"))
            r["metrics"] = metric.compute(predictions=r["scores"][:, 0], references=labels)
            r["by"] = {}
            continue
        r["metrics"] = classification_metrics(r["scores"], labels, args.threshold, args.target_precision)
        r["by"] = {c: breakdown(records, r["scores"], labels, args.threshold, c) for c in metadata_columns} \
            if r["binary"] else {}
    args.out.mkdir(parents=True, exist_ok=True)
    headline = {name: r for name, r in results.items() if r["headline"]}
    written = plots(args.out, headline, labels, records, args.threshold)
    summary = {"dataset": args.dataset, "local": Path(args.dataset).is_dir(), "split": args.split,
               "images": len(records), "skipped": skipped,
               "threshold": args.threshold, "target_precision": args.target_precision,
               "models": {name: {"headline": r["headline"], "metrics": r["metrics"], "by": r["by"],
                                 **({"weights": r["weights"]} if "weights" in r else {})}
                          for name, r in results.items()}}
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_scores(args.out / "scores.csv", records, headline)
    (args.out / "report.md").write_text(report_md(results, args, len(records), written, skipped))
    print((args.out / "report.md").read_text())
    if args.update_card:
        update_card(args.update_card, summary, args.force)
    return EXIT_SOME_FAILED if skipped else EXIT_OK
