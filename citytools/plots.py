"""benchmark.py's plots: ROC and precision-recall curves, the confusion matrix, score histograms,
detection by strength and ROC AUC by picture family, as PNG files beside report.md."""

import re

import numpy as np

SIZE_BUCKET = re.compile(r"(under )?(\d+(?:\.\d+)?)[ -]")  # "under 256 px", "256-511 px", "4 MP and more"


def sort_key(value):
    """Metadata values in a natural order: numbers by value first, then size buckets by the number
    they start at ("under 256 px" < "256-511 px" < "1024 px and more"; "under 1 MP" < "1-4 MP"), then
    other text."""
    try:
        return (0, float(value), "")
    except ValueError:
        pass
    bucket = SIZE_BUCKET.match(value)
    if bucket:
        return (1, float(bucket[2]) - (0.5 if bucket[1] else 0.0), value)
    return (2, 0.0, value)


# ------------------------------------------------------------------------------------------ report


def plots(out, results, labels, records, threshold):
    """Writes the figures of the binary headline models into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    headline = {name: r for name, r in results.items() if r["binary"]}
    if not headline:
        return []
    figures = [("roc.png", roc_plot), ("pr.png", pr_plot), ("confusion.png", confusion_plot),
               ("histograms.png", histogram_plot)]
    if any("strength" in r for r in records):
        figures.append(("strength.png", strength_plot))
    if any("family" in r for r in records):
        figures.append(("families.png", family_plot))
    for name, draw in figures:
        save_figure(draw(headline, labels, threshold), out / name)
    return [name for name, _ in figures]


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def roc_plot(headline, labels, threshold):
    from sklearn.metrics import auc, roc_curve

    def curve(r):
        x, y, _ = roc_curve(labels, r["scores"][:, 1])
        return x, y, f"AUC {auc(x, y):.3f}"

    return curve_plot(headline, curve, "ROC", "false positive rate", "true positive rate", "lower right")


def pr_plot(headline, labels, threshold):
    from sklearn.metrics import precision_recall_curve

    def curve(r):
        y, x, _ = precision_recall_curve(labels, r["scores"][:, 1])
        return x, y, f"AP {r['metrics'].get('pr_auc', float('nan')):.3f}"

    return curve_plot(headline, curve, "precision-recall", "recall", "precision", "lower left")


def curve_plot(headline, curve, title, xlabel, ylabel, legend_at):
    """One curve per model: `curve(result)` -> (x, y, what the legend adds to its name)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, r in headline.items():
        x, y, note = curve(r)
        ax.plot(x, y, label=f"{name} ({note})")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_at)
    return fig


def confusion_plot(headline, labels, threshold):
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    fig, axes = plt.subplots(1, len(headline), figsize=(3.6 * len(headline), 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], headline.items()):
        matrix = confusion_matrix(labels, (r["scores"][:, 1] >= threshold).astype(int), labels=[0, 1])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="black")
        ax.set_xticks([0, 1], ["pass", "flagged"])
        ax.set_yticks([0, 1], ["clean", "aberrated"])
        ax.set_title(name, fontsize=9)
    return fig


def histogram_plot(headline, labels, threshold):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(headline), figsize=(3.8 * len(headline), 3.2), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, (name, r) in zip(axes[0], headline.items()):
        s = r["scores"][:, 1]
        ax.hist(s[labels == 0], bins=bins, alpha=0.6, label="label 0")
        ax.hist(s[labels == 1], bins=bins, alpha=0.6, label="label 1")
        ax.axvline(threshold, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    return fig


def strength_plot(headline, labels, threshold):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in headline.items():
        rows = {k: v for k, v in r["by"].get("strength", {}).items() if sort_key(k)[0] == 0 and float(k) > 0}
        if rows:
            ax.plot([float(k) for k in rows], [v["flagged"] for v in rows.values()], marker="o", label=name)
    ax.set(xlabel="aberration strength (px)", ylabel=f"detected (score >= {threshold})", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def family_plot(headline, labels, threshold):
    """ROC AUC per picture family, one bar per headline model."""
    import matplotlib.pyplot as plt

    families = sorted({f for r in headline.values() for f, row in r["by"].get("family", {}).items()
                       if "roc_auc" in row})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(families) + 2) + 3, 4))
    width = 0.8 / max(1, len(headline))
    for i, (name, r) in enumerate(headline.items()):
        rows = r["by"].get("family", {})
        ax.bar([j + i * width for j in range(len(families))], [rows.get(f, {}).get("roc_auc", 0) for f in families],
               width, label=name)
    ax.set_xticks([j + width * (len(headline) - 1) / 2 for j in range(len(families))], families)
    low = min([row["roc_auc"] for r in headline.values() for row in r["by"].get("family", {}).values()
               if "roc_auc" in row] or [0.5])
    ax.set(ylabel="ROC AUC", ylim=(max(0.0, low - 0.05), 1.0), title="ROC AUC by picture family")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    return fig
