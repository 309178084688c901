"""release.py: the folder loads through remote code in a fresh process, the card parses, and the Hub
calls (recorded at the HfApi boundary) create, refuse an existing tag, upload and tag."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest


def metrics_summary(path, model):
    """A benchmark.py metrics.json of `model` (a folder: its weights digest is recorded, as benchmark.py does)."""
    from citytools.toolkit import weights_fingerprint

    summary = {"dataset": "data/synthetic", "split": "test", "images": 10, "threshold": 0.5,
               "target_precision": 0.95,
               "models": {"ca tiling-mean": {"headline": True, "metrics": {"roc_auc": 0.91234, "pr_auc": 0.8,
                                                                          "accuracy": 0.9, "f1": 0.85}, "by": {},
                                             "weights": weights_fingerprint(model)},
                          "fringe-baseline": {"headline": True, "metrics": {"roc_auc": 0.7}, "by": {}}}}
    path.write_text(json.dumps(summary))
    return path


class FakeApi:
    def __init__(self, tags=()):
        self.calls, self.tags = [], tags

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def list_repo_refs(self, **kwargs):
        self.calls.append(("list_repo_refs", kwargs))
        return SimpleNamespace(tags=[SimpleNamespace(name=t) for t in self.tags])

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(oid="abc123")

    def create_tag(self, **kwargs):
        self.calls.append(("create_tag", kwargs))


def test_dry_run_folder_loads_and_card_parses(converted, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from citytools.cli import release

    out = tmp_path / "dist"
    metrics = metrics_summary(tmp_path / "m.json", converted["ca"])
    assert release.main(["--model", str(converted["ca"]), "--repo-id", "me/ca", "--tag", "v1.16", "--metrics",
                         str(metrics), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would call HfApi().upload_folder(" in printed and "tag='v1.16'" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "config.json", "preprocessor_config.json", "model.safetensors", "image_processing.py",
         "configuration_cityclassifier.py", "modeling_cityclassifier.py", "fringes.py", "native_fringes.py",
         "tiling.py"])
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.license == "mit"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["roc_auc"] == 0.9123
    assert 'pipeline("image-classification", model="me/ca", trust_remote_code=True)' in card.text
    script = ("from transformers import pipeline; from PIL import Image; "
              f"p = pipeline('image-classification', model={str(out)!r}, trust_remote_code=True); "
              "print(p(Image.new('RGB', (90, 70), 'red'), top_k=None))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0 and "Chromatic Aberration" in done.stdout, done.stderr[-2000:]


def test_upload_calls_and_existing_tag_is_refused(converted, tmp_path):
    from citytools.cli import release
    from citytools.toolkit import UsageError

    api = FakeApi()
    release.main(["--model", str(converted["ca"]), "--repo-id", "me/ca", "--tag", "v2", "--out",
                  str(tmp_path / "a")], api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "list_repo_refs", "upload_folder", "create_tag"]
    assert api.calls[3][1] == {"repo_id": "me/ca", "tag": "v2", "revision": "abc123"}
    assert api.calls[2][1]["folder_path"] == str(tmp_path / "a")
    taken = FakeApi(tags=["v2"])
    with pytest.raises(UsageError, match="exists already"):
        release.main(["--model", str(converted["ca"]), "--repo-id", "me/ca", "--tag", "v2", "--out",
                      str(tmp_path / "b")], api=taken)
    assert "upload_folder" not in [name for name, _ in taken.calls]


def test_token_never_on_the_command_line():
    from citytools.cli import release

    with pytest.raises(SystemExit):
        release.parse_args(["--model", ".", "--repo-id", "me/x", "--out", "o", "--token", "hf_secret"])
