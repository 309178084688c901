#!/usr/bin/env python
"""Issue #27's release rule and its "Done when", checked from benchmark.py's metrics.json. Reads two
reports made by one `benchmark.py --passes tiling` run each (the candidate, the shipped model and the
yardstick scored on the same pictures): the real-picture test split, lossless (`data/real-check-v`),
and its JPEG/WebP-delivered version (`data/real-check-d`: the same pictures, each saved as a JPEG of
quality 75-95 or a WebP; docs/benchmark.md).

  python bench/ship_gate.py --candidate runs/default_model_stage16 \\
      --lossless bench/stage16-real-check-v --delivered bench/stage16-real-check-d --out bench/gate-stage16.json

Two verdicts, as #27 states them:
  ships (the release rule: "the new default ships only if it beats stage 5 and the yardstick in every
    family"): in every family of both reports a higher ROC AUC than the shipped model's and the
    yardstick's. Where both score 1.000 no one can score higher: that row says "level at 1" and does
    not block; a tie anywhere else blocks.
  done (#27's "Done when"): those rows and every figure besides:
    lossless: ROC AUC >= 0.995, every family >= 0.985, recall at 0.5 >= 95% for fringes of 2 px and more;
    delivered: ROC AUC >= 0.98, recall at 0.5 >= 90% for fringes of 2 px and more (every picture there
      went through JPEG 75-95 or WebP);
    both: at 0.5, at most 2% of the clean pictures of every family flagged.
The expected calibration error is shown, without a target (#27 asks that it be reported).
Beside each row against the shipped model or the yardstick, where the report's scores.csv names each
picture's source: how sure that comparison is. The family's source pictures are drawn again with
replacement (`--resamples` times; a source's variants, clean and aberrated, move together) and the
difference in ROC AUC recomputed; the note gives its 95% interval. The same beside every share (clean
pictures flagged, recall): its 95% interval with the sources drawn again. They decide nothing (the
rule asks for a higher figure, the "Done when" for a share); they say when a family rests on so few
sources, or a share on so few pictures, that no ranking or rate can be told apart.
Writes both verdicts and every row (each naming its report, value, target and which verdict it
counts for) as JSON, and the same table as Markdown beside it (.md); exits 0 whether or not the
candidate passes (the verdict is data), 2 on unusable input.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TARGETS = {"lossless_roc_auc": 0.995, "family_roc_auc": 0.985, "delivered_roc_auc": 0.98,
           "clean_flagged": 0.02, "lossless_recall_2px": 0.95, "delivered_recall_2px": 0.90}


class GateError(ValueError):
    """A report that cannot be judged: missing, or without the model or breakdown asked for."""


def load_report(folder):
    path = Path(folder) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GateError(f"{path}: cannot read a benchmark.py metrics.json ({error})") from None


def model_entry(report, name, folder):
    """The report's entry for `name`: an exact key ("fringe-baseline"), or the headline variant of
    a model given by its folder or its name in the report ("runs/stage15" -> "stage15 tiling-mean")."""
    models = report["models"]
    if name in models:
        return name, models[name]
    short = Path(name).name or "default"  # "." (the repo root) is the shipped model, "default" in reports
    headline = [key for key, entry in models.items() if key.startswith(short + " ") and entry.get("headline")]
    if len(headline) != 1:
        raise GateError(f"{folder}: no single headline entry for {name!r} (entries: {', '.join(models)})")
    return headline[0], models[headline[0]]


def recall_from(entry, min_strength, folder):
    """Recall at the report's threshold over the positives whose fringe is at least `min_strength` px
    (the `strength` breakdown: one bucket per strength, its share flagged and its size)."""
    buckets = entry["by"].get("strength")
    if not buckets:
        raise GateError(f"{folder}: no `strength` breakdown (a dataset without a strength column)")
    chosen = [(b["flagged"], b["n"]) for key, b in buckets.items() if float(key) >= min_strength and b["positives"]]
    if not chosen:
        raise GateError(f"{folder}: no positives of {min_strength} px or more")
    return sum(f * n for f, n in chosen) / sum(n for _, n in chosen), sum(n for _, n in chosen)


def beats(value, other):
    """(passes, how): higher passes; both exactly 1 is 'level at 1' and passes; anything else fails."""
    if value == 1.0 and other == 1.0:
        return True, "level at 1"
    return value > other, "higher" if value > other else ("level" if value == other else "lower")


def roc_auc(labels, scores):
    """ROC AUC as the chance that a positive scores above a negative, ties counting half (average
    ranks): the values of scikit-learn's roc_auc_score, which benchmark.py uses (the intervals of
    stage 16's verdict agree to 2e-16), without its checks of the input on every call, which made a
    verdict's 48,000 draws take 67 s instead of 3."""
    order = np.argsort(scores, kind="mergesort")
    _, counts = np.unique(scores[order], return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, the average within a tie
    positives = labels.sum()
    negatives = len(labels) - positives
    return (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def read_scores(folder):
    """The report's scores.csv (one row per picture), or None without one."""
    path = Path(folder) / "scores.csv"
    return pd.read_csv(path) if path.exists() else None


def source_draws(rows, resamples, seed=0):
    """(draws, sources): `resamples` index arrays into `rows`, each the pictures of as many sources as
    `rows` has, drawn with replacement (a source's pictures move together; a picture without one is
    a source of its own); (None, n) under 2 sources."""
    sources = rows["source"].astype(object).where(rows["source"].notna(),
                                                  [f"\0picture {i}" for i in range(len(rows))])
    members = list(sources.groupby(sources).indices.values())  # positions, sources in sorted order
    if len(members) < 2:
        return None, len(members)
    rng = np.random.default_rng(seed)
    draws = (np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
             for _ in range(resamples))
    return draws, len(members)


def source_interval(table, family, candidate, other, resamples, seed=0):
    """(low, high, sources): the 95% interval of the candidate's ROC AUC minus `other`'s over the
    `family`'s pictures, their sources drawn again with replacement `resamples` times (draws with one
    label only are skipped); None without a source column or with fewer than two sources."""
    if table is None or not {"source", "family", "label", candidate, other} <= set(table.columns):
        return None
    rows = table[table["family"] == family]
    draws, sources = source_draws(rows, resamples, seed)
    if draws is None:
        return None
    labels, ours, theirs = (rows[column].to_numpy() for column in ("label", candidate, other))
    differences = [roc_auc(labels[index], ours[index]) - roc_auc(labels[index], theirs[index])
                   for index in draws if 0 < labels[index].sum() < len(index)]
    if not differences:
        return None
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high), sources


def share_interval(rows, candidate, threshold, resamples, seed=0):
    """(low, high, sources): the 95% interval of the share of `rows` the candidate flags (score at or
    above `threshold`: a false-positive rate over clean pictures, a recall over positives), their
    sources drawn again; None without the columns, with fewer than two sources, or for a share of 0 or 1
    (every draw gives it again: resampling cannot tell how far it could be from the truth)."""
    if not {"source", candidate} <= set(rows.columns):
        return None
    flagged = rows[candidate].to_numpy() >= threshold
    draws, sources = source_draws(rows, resamples, seed)
    if draws is None or flagged.all() or not flagged.any():
        return None
    low, high = np.percentile([flagged[index].mean() for index in draws], [2.5, 97.5])
    return float(low), float(high), sources


def judge(reports, candidate, shipped, yardstick, resamples):
    """reports: {"lossless": (folder, metrics), "delivered": (folder, metrics)} -> (rows, names):
    one row per criterion: report, criterion, value, target (or the compared figure), passes."""
    rows, names = [], {}
    for kind, (folder, report) in reports.items():
        names[kind], report_rows = judge_report(kind, folder, report, candidate, shipped, yardstick, resamples)
        rows += report_rows
    return rows, names


def judge_report(kind, folder, report, candidate, shipped, yardstick, resamples):
    """One report ("lossless" or "delivered") -> (the candidate's entry name, its rows)."""
    name, entry = model_entry(report, candidate, folder)
    ship_name, ship = model_entry(report, shipped, folder)
    yard_name, yard = model_entry(report, yardstick, folder)
    table = read_scores(folder) if resamples else None
    metrics, rows = entry["metrics"], []

    def row(criterion, value, target, passes, note="", rule="done", interval=None, form=".3f"):
        """One criterion; with an interval (low, high, sources), its note and fields too."""
        if interval is not None:
            note += f"; 95% over {interval[2]} sources: {interval[0]:{form}} to {interval[1]:{form}}"
        rows.append({"report": kind, "criterion": criterion, "value": value, "target": target,
                     "passes": bool(passes), "note": note, "rule": rule})
        if interval is not None:
            rows[-1]["interval"], rows[-1]["sources"] = list(interval[:2]), interval[2]

    def flagged_interval(select):
        """The interval of the share the candidate flags among the pictures `select` picks from scores.csv
        (None where it cannot: no scores.csv, or not the column `select` needs)."""
        chosen = select(table) if table is not None else None
        return None if chosen is None else share_interval(chosen, name, report["threshold"], resamples)

    auc_target = TARGETS[f"{kind}_roc_auc"]
    row("ROC AUC", metrics["roc_auc"], f">= {auc_target}", metrics["roc_auc"] >= auc_target)
    recall, n = recall_from(entry, 2.0, folder)
    recall_target = TARGETS[f"{kind}_recall_2px"]
    row("recall at the threshold, fringes >= 2 px", recall, f">= {recall_target}", recall >= recall_target,
        f"{n} positives",
        interval=flagged_interval(lambda t: t[(t["label"] == 1) & (t["strength"] >= 2.0)] if "strength" in t else None))
    row("expected calibration error", metrics["ece"], "reported", True)
    families = entry["by"].get("family")
    if not families:
        raise GateError(f"{folder}: no `family` breakdown (a dataset without a family column)")
    for family, figures in sorted(families.items()):
        if "roc_auc" not in figures:  # one label only (sketches): no ranking to judge
            continue
        value = figures["roc_auc"]
        if kind == "lossless":
            row(f"ROC AUC, {family}", value, f">= {TARGETS['family_roc_auc']}", value >= TARGETS["family_roc_auc"])
        for label, other, other_name in (("shipped model", ship, ship_name), ("yardstick", yard, yard_name)):
            theirs = other["by"]["family"][family]["roc_auc"]
            passes, how = beats(value, theirs)
            row(f"ROC AUC, {family}, against the {label}", value, f"> {theirs:.4f}", passes, how, rule="ships",
                interval=source_interval(table, family, name, other_name, resamples), form="+.4f")
    for family, figures in sorted(entry["by"].get("clean family", {}).items()):
        row(f"clean {family} flagged", figures["flagged"], f"<= {TARGETS['clean_flagged']}",
            figures["flagged"] <= TARGETS["clean_flagged"], f"of {figures['n']}",
            interval=flagged_interval(lambda t, f=family: t[t["clean family"] == f] if "clean family" in t else None))
    return name, rows


def markdown(verdict):
    ship_rows = [r for r in verdict["criteria"] if r["rule"] == "ships"]
    ships = (f"**Ships** as the new default: it beats the shipped model and the yardstick in every family "
             f"({len(ship_rows)} rows)." if verdict["ships"] else
             f"**Does not ship**: {sum(not r['passes'] for r in ship_rows)} of the {len(ship_rows)} rows against the "
             "shipped model and the yardstick fail.")
    done = (f"#27's \"Done when\": {'**met**' if verdict['done'] else 'not met'}, {verdict['passed']} of "
            f"{verdict['rows']} criteria.")
    lines = [f"# Issue #27's release rule: {verdict['candidate']}", "", ships, "", done, "",
             *[f"- {kind}: `{folder}` ({verdict['pictures'][kind][0]}, {verdict['pictures'][kind][1]} pictures)"
               for kind, folder in verdict["reports"].items()],
             "", "| report | criterion | value | target | met | note |", "| --- | --- | --- | --- | --- | --- |"]
    for r in verdict["criteria"]:
        lines.append(f"| {r['report']} | {r['criterion']} | {r['value']:.4f} | {r['target']} | "
                     f"{'yes' if r['passes'] else '**no**'} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot(verdict, path):
    """The verdict as a forest plot (PNG at `path`): left, every ROC AUC difference against the shipped
    model and the yardstick with its 95% interval and zero marked; right, the clean pictures flagged
    and the recall, each with its interval and a tick at its target. Rows that fail are red.
    -> the rows drawn, as (panel, label, value, low, high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = verdict["criteria"]
    panels = [("ROC AUC minus the other's", [r for r in criteria if r["rule"] == "ships"]),
              ("clean pictures flagged", [r for r in criteria if r["criterion"].endswith("flagged")]),
              ("recall, fringes >= 2 px", [r for r in criteria if r["criterion"].startswith("recall")])]
    figure = plt.figure(figsize=(12, 1.5 + 0.22 * max(len(panels[0][1]), len(panels[1][1]) + len(panels[2][1]), 4)))
    grid = figure.add_gridspec(2, 2, height_ratios=[max(len(panels[1][1]), 1), max(len(panels[2][1]), 1) + 2])
    axes = [figure.add_subplot(grid[:, 0]), figure.add_subplot(grid[0, 1]), figure.add_subplot(grid[1, 1])]
    drawn = []
    for panel, (axis, (title, chosen)) in enumerate(zip(axes, panels)):
        labels = []
        for y, r in enumerate(reversed(chosen)):
            labels.append(f"{r['report']}: {r['criterion'].replace('ROC AUC, ', '').replace(', fringes >= 2 px', '')}")
            if panel == 0:  # the difference from the figure it had to beat ("> 0.9969")
                value = r["value"] - float(r["target"].removeprefix("> "))
            else:  # a share, its target ("<= 0.02", ">= 0.9") ticked
                value = r["value"]
                target = float(r["target"].split()[-1])
                axis.plot([target, target], [y - 0.4, y + 0.4], color="0.2", linewidth=1.5)
            low, high = r.get("interval", (value, value))
            colour = "tab:blue" if r["passes"] else "tab:red"
            axis.plot([low, high], [y, y], color=colour, linewidth=2, alpha=0.6)
            axis.plot([value], [y], "o", color=colour, markersize=4)
            drawn.append((panel, labels[-1], value, low, high))
        axis.set_yticks(range(len(chosen)), labels, fontsize=7)
        axis.set_ylim(-0.7, len(chosen) - 0.3)
        axis.set_title(title, fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0].axvline(0, color="0.2", linewidth=1)
    figure.suptitle(f"{verdict['candidate']}: {'ships' if verdict['ships'] else 'does not ship'}, "
                    f"{'done' if verdict['done'] else 'not done'} ({verdict['passed']} of {verdict['rows']}); "
                    "bars: 95% intervals, sources drawn again; red: fails", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", required=True,
                        help="the candidate: its model folder as given to benchmark.py, or its report entry")
    parser.add_argument("--lossless", required=True, help="benchmark.py report folder of the lossless test split")
    parser.add_argument("--delivered", required=True, help="report folder of its JPEG/WebP-delivered version")
    parser.add_argument("--shipped", default=".", help="the shipped model, as given to benchmark.py (default: .)")
    parser.add_argument("--yardstick", default="fringe-baseline",
                        help="the yardstick's report entry (default: fringe-baseline)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="draws of each family's sources for the 95%% intervals (0: none; default: 1000)")
    parser.add_argument("--out", type=Path, help="write the verdict here as JSON, and beside it as Markdown (.md) "
                                                 "and as a forest plot of every interval (.png)")
    args = parser.parse_args(argv)
    try:
        reports = {kind: (folder, load_report(folder)) for kind, folder in
                   (("lossless", args.lossless), ("delivered", args.delivered))}
        pictures = {kind: (r["dataset"], r["images"]) for kind, (_, r) in reports.items()}
        rows, names = judge(reports, args.candidate, args.shipped, args.yardstick, args.resamples)
    except (GateError, KeyError) as error:
        print(f"ship_gate.py: error: {error}", file=sys.stderr)
        return 2
    verdict = {"candidate": args.candidate, "entries": names, "shipped": args.shipped, "yardstick": args.yardstick,
               "reports": {kind: folder for kind, (folder, _) in reports.items()}, "pictures": pictures,
               "ships": all(r["passes"] for r in rows if r["rule"] == "ships"), "done": all(r["passes"] for r in rows),
               "rows": len(rows), "passed": sum(r["passes"] for r in rows),
               "failed": [f"{r['report']}: {r['criterion']}" for r in rows if not r["passes"]], "criteria": rows}
    text = markdown(verdict)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(verdict, indent=1) + "\n")
        picture = args.out.with_suffix(".png")
        plot(verdict, picture)
        args.out.with_suffix(".md").write_text(text + f"\n![{picture.stem}]({picture.name})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
