"""The datasets route's output as a dataset of its own: what scored it (the parquet file's metadata),
and `--push-to-hub`, which uploads the scores with a card saying what model scored them and how they
join back to the source."""

import datetime
import tempfile
from pathlib import Path

from citytools.cards import hub_id
from citytools.toolkit import UsageError, first_line


def model_revision(name):
    """The commit a Hub model's files come from (its snapshot folder in the cache), or None for a local folder."""
    if Path(name).is_dir() or not hub_id(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json"])).name
    except Exception:  # noqa: BLE001 - the revision is information; the weights digest identifies them anyway
        return None


def scores_metadata(args, scorer, source):
    """What the scores are of and what made them (JSON-able): the parquet output's `cityclassifier`
    metadata and the card's facts. Local paths are never written: a folder shows as its name."""
    models = []
    for name, setup in zip(args.model, scorer.setup()["models"]):
        models.append(dict(setup, source=hub_id(name) or Path(name).resolve().name, revision=model_revision(name)))
    data = source.description()
    data["dataset"] = hub_id(data["dataset"]) or Path(data["dataset"]).name
    data["data_files"] = [f if str(f).startswith("hf://") else Path(f).name for f in data["data_files"]]
    return {"models": models, "source": data, "key_columns": list(source.key_columns()),
            "score_columns": scorer.columns(), "dtype": str(scorer.dtype).replace("torch.", ""),
            "max_pixels": int(args.max_pixels), "written": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds")}


def join_recipe(metadata, repo):
    """The card's code: the scores joined back to the source on its key, then filtered."""
    keys = metadata["key_columns"]
    column = next(c for c in metadata["score_columns"] if not c.endswith(":top_label"))
    join = keys[1] if len(keys) == 2 or keys[1] == "__key__" else None
    source = metadata["source"]
    files = f", data_files={source['data_files']!r}" if source["data_files"] else ""
    lines = ["from datasets import load_dataset", "",
             f'scores = load_dataset("{repo}", split="{source["split"]}")',
             f'kept = {{row["{join or "key"}"] for row in scores if row["error"] is None and row["{column}"] < 0.5}}']
    if join:
        config = f', "{source["config"]}"' if source.get("config") else ""
        lines += [f'source = load_dataset("{source["dataset"]}"{config}{files}, split="{source["split"]}", '
                  'streaming=True)',
                  f'clean = source.filter(lambda sample: sample["{join}"] in kept)']
    else:
        lines += ["# `key` is `<data file>#<row>`: the sample's file below the split's folder and its row in that file"]
    return "\n".join(lines)


def scores_card(metadata, repo, splits):
    """README.md of a scores dataset: the data files of `splits`, what scored them, how to join."""
    configs = "".join(f"    - split: {s}\n      path: data/{s}-*.parquet\n" for s in sorted(splits))
    models = "\n".join(f"- `{m['key']}`: {m['source']}" + (f" (revision {m['revision']})" if m["revision"] else "")
                       + f", weights digest `{m['weights']}`, tiling {m['tiling']}, combine {m['combine']}"
                       for m in metadata["models"])
    source = metadata["source"]
    return f"""---
configs:
  - config_name: default
    data_files:
{configs}tags:
  - cityclassifier
  - chromatic-aberration
---
# Chromatic aberration scores for {source['dataset']}

One row per sample of `{source['dataset']}` (split `{source['split']}`), written by cityclassifier's
`classify.py --dataset`: the sample's key ({', '.join(f'`{k}`' for k in metadata['key_columns'])}), its
`width` and `height`, `error` (null when scored, else why it could not be), and the score columns
({', '.join(f'`{c}`' for c in metadata['score_columns'])}).

Scored with ({metadata['dtype']}, images up to {metadata['max_pixels']} pixels):
{models}

## Join and filter

```python
{join_recipe(metadata, repo)}
```
Rows with an `error` have no scores (a sample that could not be decoded; `<shard>#unreadable` for a
data file that could not be read on): the recipe keeps only samples scored below 0.5.
"""


def push_scores(out, repo, metadata, private=False, api=None):
    """Uploads `out` (the scores' parquet file) to the Hub dataset `repo` as data/<split>-00000-of-00001.parquet,
    with a card (`scores_card`) covering the splits already there; one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()
    split = metadata["source"]["split"]
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        there = api.list_repo_files(repo, repo_type="dataset")
        splits = {Path(f).name.split("-", 1)[0] for f in there if f.startswith("data/") and f.endswith(".parquet")}
        card = scores_card(metadata, repo, splits | {split})
        with tempfile.TemporaryDirectory() as folder:
            readme = Path(folder) / "README.md"
            readme.write_text(card)
            api.create_commit(repo, repo_type="dataset", commit_message=f"cityclassifier scores of {split}",
                              operations=[CommitOperationAdd(f"data/{split}-00000-of-00001.parquet", str(out)),
                                          CommitOperationAdd("README.md", str(readme))])
    except Exception as error:  # noqa: BLE001 - no network, no token, no rights: one line, the scores stay
        raise UsageError(f"--push-to-hub {repo}: cannot upload ({first_line(error)}); the scores are in {out}: "
                         "rerun the same command to retry (nothing is scored again)") from None
    print(f"pushed {out} to https://huggingface.co/datasets/{repo}", flush=True)
