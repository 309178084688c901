"""benchmark.py: all outputs with stable keys, the classical baseline, and the model card block."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_benchmark_split


def test_baseline_scores_a_shifted_image_above_its_clean_original():
    from citytools.baseline import FringeBaseline
    from citytools.cli import make_synthetic_data as m

    rng = np.random.default_rng(1)
    clean = m.draw_illustration(rng, 900, 700)
    shifted = m.channel_shift(clean, rng, 4.0)
    baseline = FringeBaseline()
    assert baseline.width(shifted) > baseline.width(clean) + 1.0
    assert baseline(shifted)["Chromatic Aberration"] > baseline(clean)["Chromatic Aberration"]


def test_benchmark_writes_metrics_report_plots_and_a_card(converted, tmp_path):
    from huggingface_hub import ModelCard

    from citytools.cli import benchmark

    data = tmp_path / "data" / "test"
    write_benchmark_split(data)
    (data / "1_shift" / "broken.png").write_bytes(b"not a png")  # reported and left out, not fatal
    card_dir = tmp_path / "card"
    shutil.copytree(converted["ca"], card_dir)
    out = tmp_path / "report"
    assert benchmark.main(["--model", str(converted["ca"]), "--dataset", str(tmp_path / "data"), "--split", "test",
                           "--out", str(out), "--workers", "0", "--update-card", str(card_dir), "--force"]) == 1
    # exit 1: broken.png failed; --force publishes the figures of the other 8 (without it: refused)
    for name in ("metrics.json", "report.md", "roc.png", "pr.png", "confusion.png", "histograms.png",
                 "strength.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 8
    assert [Path(x["path"]).name for x in metrics["skipped"]] == ["broken.png"]
    variants = set(metrics["models"])
    assert {"ca tiling-mean", "ca tiling-median", "ca tiling-max", "ca tiling-min", "ca no-tiling",
            "fringe-baseline"} == variants
    head = metrics["models"]["ca tiling-mean"]
    assert head["headline"] is True
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "ece", "threshold_at_target_precision"):
        assert key in head["metrics"]
    assert set(head["by"]) == {"effect", "strength", "shift strength"} and head["by"]["effect"]["shift"]["n"] == 4
    card = ModelCard.load(card_dir / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["roc_auc"] == round(head["metrics"]["roc_auc"], 4)
    assert "Chromatic Aberration" in card.text  # the body is kept


def test_a_card_reporting_another_dataset_is_not_overwritten_unless_forced(tmp_path):
    from citytools.cards import update_card
    from citytools.cli import benchmark
    from citytools.toolkit import UsageError

    card_dir = tmp_path / "card"
    card_dir.mkdir()
    (card_dir / "config.json").write_text("{}")  # a model folder
    summary = {"dataset": "data/real", "split": "test", "models": {"m tiling-mean": {
        "headline": True, "metrics": {"roc_auc": 0.9}}}}
    update_card(card_dir, summary)
    before = (card_dir / "README.md").read_text()
    # refused up front, before the (here missing) dataset is even read: a one-line usage error
    with pytest.raises(UsageError, match=r"reports results on data/real \(test\).*--force"):
        benchmark.main(["--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                        "--update-card", str(card_dir)])
    assert (card_dir / "README.md").read_text() == before
    update_card(card_dir, {**summary, "split": "validation"}, force=True)
    assert "validation" in (card_dir / "README.md").read_text()
    update_card(card_dir, {**summary, "split": "validation"})  # the same evaluation again: fine


def test_help_is_answered_before_torch_is_imported():
    from conftest import run_script_watching_imports

    code, torch_imported, _, out, _ = run_script_watching_imports("benchmark.py", ["--help"])
    assert code == 0 and not torch_imported and "--update-card" in out


def test_numbers_out_of_range_are_usage_errors():
    from citytools.cli import benchmark

    for bad in (["--batch-size", "0"], ["--workers", "-1"], ["--threshold", "1.5"], ["--max-images", "0"]):
        with pytest.raises(SystemExit) as info:
            benchmark.parse_args(["--dataset", "d", "--out", "o", *bad])
        assert info.value.code == 2


def test_a_dataset_that_cannot_be_loaded_is_one_line(tmp_path):
    from citytools.cli.benchmark import load_records
    from citytools.toolkit import UsageError

    for dataset, words in ((tmp_path / "no-such-folder", "Couldn't find any data file"),
                           ("someone/not-on-this-machine", "cannot load the dataset")):
        with pytest.raises(UsageError, match=words) as info:
            load_records(str(dataset), "test")
        assert "\n" not in str(info.value)


def test_a_local_dataset_appears_in_cards_by_name_only(tmp_path):
    from huggingface_hub import ModelCard

    from citytools.cards import card_text, update_card

    folder = tmp_path / "data" / "real"
    folder.mkdir(parents=True)
    summary = {"dataset": str(folder), "local": True, "split": "test", "images": 4, "threshold": 0.5,
               "models": {"m tiling-mean": {"headline": True, "metrics": {"roc_auc": 0.9}}}}
    (tmp_path / "config.json").write_text("{}")  # a model folder
    update_card(tmp_path, summary)
    text = card_text({"arch": "class", "id2label": {"0": "Pass", "1": "CA"}}, "me/m", summary=summary)
    for written in ((tmp_path / "README.md").read_text(), text):
        assert str(tmp_path) not in written and "real (test)" in written
    assert ModelCard(text).data.datasets is None  # metadata names Hub datasets only
