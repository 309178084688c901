"""Hub model cards for the folders the tools write (converted releases, releases of trained models)
and the model-index that benchmark.py keeps in them: one home for card code."""

from pathlib import Path

from citytools.toolkit import UsageError, first_line

CLIP_BASE = "openai/clip-vit-large-patch14-336"
BASELINE = "fringe-baseline"  # benchmark.py's entry for the classical detector: not a model of the card
METRICS = ("roc_auc", "pr_auc", "accuracy", "f1", "recall", "precision", "mae", "spearman")


def hub_id(name):
    """`name` when it reads as a Hub repo id (owner/name, not a path on this machine), else None: a
    card or config must never carry a local path."""
    name = str(name or "")
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")) or Path(name).exists():
        return None
    return name


def base_model(config):
    """The backbone's Hub id for a config dict: the CLIP it was built from when that was a Hub id,
    else openai/clip-vit-large-patch14-336 for a converted release of that shape, else None."""
    vision = config.get("vision_config") or {}
    named = hub_id(vision.get("_name_or_path"))
    if named:
        return named
    return CLIP_BASE if config.get("original_name") and vision.get("hidden_size") == 1024 else None


def dataset_id(summary):
    """The dataset a benchmark.py summary names, as a card may show it: the Hub id, or for a local
    folder (`"local": true`, written by benchmark.py) only the folder's name, never its path."""
    dataset = summary["dataset"]
    local = summary.get("local", not hub_id(dataset))
    return Path(dataset).name if local else dataset


def eval_results(summary):
    """huggingface_hub EvalResults for the headline learned models of a benchmark.py summary."""
    from huggingface_hub import EvalResult

    dataset = dataset_id(summary)
    results = []
    for name, entry in summary["models"].items():
        if not entry["headline"] or name == BASELINE:
            continue
        for metric in METRICS:
            value = entry["metrics"].get(metric)
            if value is not None:
                results.append(EvalResult(
                    task_type="image-classification", dataset_type=dataset,
                    dataset_name=f"{dataset} ({summary['split']})", dataset_split=summary["split"],
                    metric_type=metric, metric_value=round(value, 4), metric_name=f"{metric} ({name})"))
    return results


def read_summary(path):
    """A benchmark.py metrics.json, checked for the shape cards read (dataset, split, images, threshold,
    models with headline and metrics): a UsageError in one line naming what is missing."""
    import json

    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: cannot read metrics ({first_line(error)})") from None
    fields = {"dataset": str, "split": str, "images": int, "threshold": (int, float), "models": dict}
    if not isinstance(summary, dict):
        wrong = list(fields)
    else:
        wrong = [name for name, kind in fields.items() if not isinstance(summary.get(name), kind)]
    if not wrong:
        wrong = [f"models.{name}" for name, entry in summary["models"].items() if not isinstance(entry, dict)
                 or not isinstance(entry.get("headline"), bool) or not isinstance(entry.get("metrics"), dict)]
    if wrong:
        raise UsageError(f"{path}: not a benchmark.py metrics.json (missing or malformed: {', '.join(wrong[:4])})")
    return summary


def check_summary_is_of(summary, path, fingerprint):
    """Refuses a benchmark summary that does not hold results of the weights `fingerprint` names
    (`toolkit.weights_fingerprint`): a card must never publish another model's figures."""
    measured = {name: entry.get("weights") for name, entry in summary["models"].items()
                if entry["headline"] and name != BASELINE}
    if fingerprint in measured.values():
        return
    if not any(measured.values()):
        raise UsageError(f"{path}: names no weights for its models (written by an older benchmark.py): run "
                         "benchmark.py on this model again")
    raise UsageError(f"{path}: holds results of other weights ({', '.join(measured)}), not of this model's "
                     f"(weights {fingerprint[:12]}...)")


def load_card(model_dir, dataset, split, force=False):
    """MODEL_DIR/README.md as a ModelCard, MODEL_DIR being a model folder (a new card if it has none).
    Refused in one line: a folder that does not exist or holds no config.json, a README that is not a
    model card (no YAML front matter: plain notes) or whose front matter does not parse, and, unless
    `force`, a card that reports results on another dataset or split (`dataset` as `dataset_id` gives
    it): its published numbers would be replaced by figures of a different evaluation."""
    from huggingface_hub import ModelCard

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        what = "no such folder" if not folder.exists() else "not a folder" if not folder.is_dir() else \
            "not a model folder (no config.json)"
        raise UsageError(f"--update-card {folder}: {what}")
    readme = folder / "README.md"
    if readme.exists():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if not text.startswith("---"):
            raise UsageError(f"{readme}: not a model card (no YAML front matter); left as it is")
        try:
            card = ModelCard(text)
        except Exception as error:  # noqa: BLE001 - YAML and metadata errors alike: one line
            raise UsageError(f"{readme}: its YAML front matter does not parse ({first_line(error)})") from None
    else:
        card = ModelCard("---\nlibrary_name: transformers\n---\n")
    published = {(r.dataset_type, r.dataset_split) for r in card.data.eval_results or []}
    if published - {(dataset, split)} and not force:
        shown = ", ".join(f"{d} ({s})" for d, s in sorted(published, key=str))
        raise UsageError(f"{readme} reports results on {shown}, not {dataset} ({split}): pass --force to replace them")
    return card


def update_card(model_dir, summary, force=False):
    """Writes a benchmark.py summary into MODEL_DIR/README.md as the Hub's model-index, keeping the rest.
    Images that could not be scored (`summary["skipped"]`) refuse it unless `force`: the card would
    publish figures of part of the split as if of all of it."""
    if summary.get("skipped") and not force:
        raise UsageError(f"{model_dir}: card not updated: {len(summary['skipped'])} image(s) of the split could not "
                         "be scored (see report.md); pass --force to publish the figures of the rest")
    card = load_card(model_dir, dataset_id(summary), summary["split"], force)
    card.data.eval_results = eval_results(summary)
    card.data.model_name = card.data.model_name or Path(model_dir).resolve().name
    card.save(Path(model_dir) / "README.md")


def card_text(config, repo_id, license="mit", summary=None, source=None):
    """A model card for a model folder's config dict: metadata (base model, `custom_code` tag, a
    dataset only when it is a Hub id), what the model is, a usage snippet for `repo_id` (a Hub id, or
    the folder as the user will name it) and, with a benchmark summary, its results."""
    from huggingface_hub import ModelCard, ModelCardData

    converted = config.get("original_name")
    labels = list(config.get("id2label", {}).values())
    dataset = dataset_id(summary) if summary else None
    dataset = dataset if dataset and hub_id(dataset) else None  # metadata takes Hub datasets only
    data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="image-classification",
        tags=["cityclassifier", "anime", "image-quality", "dataset-cleaning", "custom_code"],
        base_model=base_model(config), datasets=[dataset] if dataset else None,
        model_name=str(repo_id).rstrip("/").split("/")[-1], eval_results=eval_results(summary) if summary else None,
    )
    title = f"{converted} {config.get('original_rev') or ''}".strip() if converted else data.model_name
    origin = (f"city96's CityClassifiers release `{title}`, converted with `convert_original.py`; its scores equal "
              "the original code's.") if converted else "Trained with cityclassifier's `train_hf.py`."
    table = ""
    if summary:
        rows = [f"| {name} | " + " | ".join(f"{entry['metrics'].get(m, float('nan')):.3f}" for m in
                                             ("roc_auc", "pr_auc", "accuracy", "f1")) + " |"
                for name, entry in summary["models"].items() if entry["headline"] and "roc_auc" in entry["metrics"]]
        shown = dataset_id(summary)
        table = (f"\n## Evaluation\n\n{shown} ({summary['split']}, {summary['images']} images), "
                 f"threshold {summary['threshold']}:\n\n| model | ROC AUC | PR AUC | accuracy | F1 |\n"
                 "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    body = f"""
# {title}

{origin}{f" {source}" if source else ""} Labels: {', '.join(labels) or 'one score in [0, 1]'}.
Tiling: {'five crops on large images' if config.get('arch') == 'class' else 'none (a score model)'};
tile combination `{config.get('tile_combine', 'mean')}`.

## Usage

```python
from transformers import pipeline

pipe = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
pipe("image.png", top_k=None)
```

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True, tile_combine="max")
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True, tiling=False)
```

Whole folders, resumable and safe on bad files: `python classify.py FOLDER --model {repo_id}` from the
cityclassifier tool-kit.
{table}"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))
