"""Every tool keeps classify.py's promises (issue 25): no silent wrong result, no lost work, bad input
refused in one line before the work, exit 1 when files failed. One test per case a careful user hit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_image

from citytools.toolkit import UsageError

TINY_VISION = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 30, "patch_size": 6, "projection_dim": 16})


def folder_of_images(root, layout):
    """{relative path: seed} -> an image folder; a seed of None writes a file that is no image."""
    for relative, seed in layout.items():
        path = Path(root) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if seed is None:
            path.write_bytes(b"not an image")
        else:
            make_image(80 + seed, 60, seed=seed).save(path)
    return Path(root)


def labelled(root, splits=("train", "validation"), per_label=3):
    return folder_of_images(root, {f"{split}/{label}/{i}.png": 10 * n + i for n, split in enumerate(splits)
                                   for label in ("0_pass", "1_ca") for i in range(per_label)})


def train(*args):
    from citytools.cli import train_hf

    return train_hf.main([str(a) for a in args])


def tiny_training(data, out, *extra):
    return train("--dataset_name", data, "--output_dir", out, "--vision_config", TINY_VISION, "--head_hidden_size",
                 "8", "--max_steps", "4", "--per_device_train_batch_size", "2", "--eval_strategy", "steps",
                 "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
                 "--use_cpu", "true", "--disable_tqdm", "true", *extra)


def one_line(info):
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------ silent wrong results, lost work


def test_train_refuses_label_folders_without_numbers_before_any_work(tmp_path):
    """`pass/` and `aberration/` trained as labels 1 and 0 (alphabetical order), with exit 0."""
    data = folder_of_images(tmp_path / "data", {f"train/{name}/{i}.png": i for name in ("pass", "aberration")
                                                for i in range(3)})
    with pytest.raises(UsageError, match="without a label id, in aberration, pass") as info:
        train("--dataset_name", data, "--output_dir", tmp_path / "o", "--vision_config", TINY_VISION,
              "--eval_split", "", "--max_steps", "1")
    one_line(info)
    assert not (tmp_path / "o").exists()


def test_overwrite_never_replaces_a_training_run_or_an_input(converted, tmp_path):
    from citytools.cli import average_models, release

    run = shutil.copytree(converted["ca"], tmp_path / "run")  # a train_hf output: a model and its history
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run / "loss.csv").write_text("step,loss\n1,0.5\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(UsageError, match=r"holds what this tool does not write \(checkpoint-2/, loss.csv\)") as info:
        average_models.main([str(converted["ca"]), str(converted["ca"]), "--out", str(run), "--overwrite"])
    one_line(info)
    with pytest.raises(UsageError, match="is one of this command's inputs"):  # the case: RUN is FIRST too
        average_models.main([str(run), str(converted["ca"]), "--out", str(run), "--overwrite"])
    copy = shutil.copytree(converted["ca"], tmp_path / "copy")  # a model folder: replaceable, but an input here
    for main, args in ((average_models.main, [str(copy), str(converted["ca"]), "--out", str(copy), "--overwrite"]),
                       (release.main, ["--model", str(copy), "--repo-id", "me/x", "--out", str(copy), "--overwrite",
                                       "--dry-run"])):
        with pytest.raises(UsageError, match="is one of this command's inputs"):
            main(args)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (copy / "model.safetensors").read_bytes() == (converted["ca"] / "model.safetensors").read_bytes()


def test_a_resumed_run_keeps_its_whole_loss_history(tmp_path):
    data = labelled(tmp_path / "data")
    out = tmp_path / "run"
    assert tiny_training(data, out) == 0
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 2's checkpoint
    assert tiny_training(data, out, "--max_steps", "6", "--resume_from_checkpoint", "last") == 0
    with open(out / "loss.csv") as f:
        steps = [int(row.split(",")[0]) for row in f.read().splitlines()[1:]]
    assert {1, 2, 3, 4, 5, 6} <= set(steps), steps  # the steps before the resume too


def test_resume_skips_checkpoints_a_kill_cut_short_and_refuses_a_named_broken_one(tmp_path, capsys):
    from transformers import Trainer

    data = labelled(tmp_path / "data")
    out = tmp_path / "run"
    assert tiny_training(data, out) == 0
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # killed while saving
    weights = out / "checkpoint-2" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) - 100])  # and this one's weights cut short
    with pytest.raises(UsageError, match="no complete checkpoint"):
        tiny_training(data, out, "--max_steps", "6", "--resume_from_checkpoint", "last")
    err = capsys.readouterr().err
    assert "checkpoint-4 skipped: no trainer_state.json" in err and "checkpoint-2 skipped: model.safetensors" in err
    with pytest.raises(UsageError, match="checkpoint-2: model.safetensors is unreadable") as info:
        tiny_training(data, out, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    one_line(info)
    weights.write_bytes(good)
    resumed = []
    original = Trainer._load_from_checkpoint
    Trainer._load_from_checkpoint = lambda self, folder, *a, **k: (resumed.append(folder), original(self, folder, *a,
                                                                                                        **k))[1]
    try:
        assert tiny_training(data, out, "--max_steps", "6", "--resume_from_checkpoint", "last") == 0
    finally:
        Trainer._load_from_checkpoint = original
    assert resumed and Path(resumed[0]).name == "checkpoint-2"  # the last complete one
    assert "checkpoint-4 skipped" in capsys.readouterr().err


def test_update_card_and_release_refuse_what_does_not_match(converted, tmp_path):
    from citytools.cards import load_card
    from citytools.cli import benchmark, release

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("{}")
    (notes / "README.md").write_text("My notes on this run.\n")
    with pytest.raises(UsageError, match="not a model card"):
        load_card(notes, "d", "test")
    assert (notes / "README.md").read_text() == "My notes on this run.\n"
    (notes / "README.md").write_text("---\nlicense: [mit\n---\n# card\n")
    with pytest.raises(UsageError, match="front matter does not parse") as info:
        load_card(notes, "d", "test")
    one_line(info)
    for where, words in ((tmp_path / "nowhere", "no such folder"), (notes / "README.md", "not a folder")):
        with pytest.raises(UsageError, match=words):
            benchmark.main(["--model", str(converted["ca"]), "--dataset", str(tmp_path / "nodata"), "--out",
                            str(tmp_path / "b"), "--update-card", str(where)])
    assert not (tmp_path / "nowhere").exists()

    summary = {"dataset": "d", "split": "test", "images": 4, "threshold": 0.5, "models": {
        "ca tiling-mean": {"headline": True, "metrics": {"roc_auc": 0.9}, "by": {}, "weights": "0" * 32}}}
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps(summary))
    args = ["--model", str(converted["ca"]), "--repo-id", "me/ca", "--metrics", str(metrics), "--out",
            str(tmp_path / "dist"), "--dry-run"]
    with pytest.raises(UsageError, match="holds results of other weights"):
        release.main(args)
    for wrong, words in (({k: v for k, v in summary.items() if k != "dataset"}, "malformed: dataset"),
                         ([1, 2], "malformed"), ({**summary, "models": {"x": []}}, "models.x")):
        metrics.write_text(json.dumps(wrong))
        with pytest.raises(UsageError, match=words) as info:
            release.main(args)
        one_line(info)
    assert not (tmp_path / "dist").exists()


# -------------------------------------------------------------------- one line, before the work, exit 2


@pytest.mark.parametrize("case", ["one-class-validation", "output-dir-file", "resume-missing", "no-weights",
                                  "loss-weights", "vision-config", "negative-label"])
def test_train_answers_bad_arguments_in_one_line(case, converted, tmp_path):
    data = labelled(tmp_path / "data")
    args, words = ["--vision_config", TINY_VISION], None
    if case == "one-class-validation":
        shutil.rmtree(data / "validation" / "1_ca")
        words = "the 'validation' split has only label"
    elif case == "output-dir-file":
        (tmp_path / "o").write_text("a file")
        words = "is a file"
    elif case == "resume-missing":
        args += ["--resume_from_checkpoint", str(tmp_path / "gone")]
        words = "no such checkpoint"
    elif case == "no-weights":
        model = shutil.copytree(converted["ca"], tmp_path / "model")
        (model / "model.safetensors").unlink()
        args = ["--model_name_or_path", str(model)]
        words = "cannot load the model"
    elif case == "loss-weights":
        args += ["--label_loss_weights", "1,2,3"]
        words = "2 positive numbers needed"
    elif case == "vision-config":
        args = ["--vision_config", "{hidden_size: 32"]
        words = "not a CLIP vision config"
    elif case == "negative-label":
        shutil.move(data / "train" / "1_ca", data / "train" / "-1_aberration")
        words = "without a label id, in -1_aberration"
    with pytest.raises(UsageError, match=words) as info:
        train("--dataset_name", data, "--output_dir", tmp_path / "o", "--max_steps", "1", "--use_cpu", "true", *args)
    one_line(info)


def test_benchmark_refuses_bad_models_and_outputs_before_scoring(converted, tmp_path, monkeypatch):
    from citytools.cli import benchmark

    data = labelled(tmp_path / "data", splits=("test",))
    model = shutil.copytree(converted["ca"], tmp_path / "model")
    (model / "model.safetensors").unlink()
    base = ["--dataset", str(data), "--no-baseline", "--workers", "0"]
    with pytest.raises(UsageError, match="no model.safetensors") as info:
        benchmark.main(["--model", str(model), "--out", str(tmp_path / "b"), *base])
    one_line(info)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    monkeypatch.setattr(benchmark, "model_scores", lambda *a: pytest.fail("scored before refusing"))
    for option in (["--out", str(a_file)], ["--out", str(tmp_path / "b"), "--update-card", str(a_file)]):
        with pytest.raises(UsageError, match="a-file"):
            benchmark.main(["--model", str(converted["ca"]), *option, *base])
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("case", ["shape", "labels-list", "json-list", "few-labels", "score-arch", "out-file"])
def test_convert_refuses_heads_and_configs_that_do_not_fit_before_loading_clip(case, releases, tiny_clip,
                                                                               tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from citytools.cli import convert_original

    head = shutil.copy(releases["ca"], tmp_path / "CCAnime-ChromaticAberration-v1.16.safetensors")
    head = Path(head)
    config = head.with_name("CCAnime-ChromaticAberration-v1.16.config.json")
    release = json.loads(Path(str(releases["ca"]).replace(".safetensors", ".config.json")).read_text())
    out, words = tmp_path / "out", None
    if case == "shape":
        state = load_file(str(head))
        state["down.1.weight"] = torch.zeros(64, 100)
        save_file(state, str(head))
        words = r"down.1.weight has shape \[64, 100\]"
    elif case == "labels-list":
        release["labels"] = ["Pass", "Chromatic Aberration"]
        words = "labels must be an object"
    elif case == "json-list":
        release = [release]
        words = "not a release config"
    elif case == "few-labels":
        release["labels"] = {"0": "Pass"}
        words = "the head has 2 outputs"
    elif case == "score-arch":
        release["arch"] = "score"
        words = "needs a head with 1 output"
    elif case == "out-file":
        out.write_text("mine")
        words = "is a file"
    config.write_text(json.dumps(release))
    monkeypatch.setattr(convert_original, "model_from_clip", lambda *a, **k: pytest.fail("CLIP loaded first"))
    with pytest.raises(UsageError, match=words) as info:
        convert_original.main(["--head", str(head), "--clip", str(tiny_clip), "--out", str(out)])
    one_line(info)


def test_release_upload_checks_the_hub_before_writing_the_folder(converted, tmp_path):
    from citytools.cli import release

    with pytest.raises(UsageError, match="the Hub is switched off") as info:  # tests run with HF_HUB_OFFLINE=1
        release.main(["--model", str(converted["ca"]), "--repo-id", "me/ca", "--out", str(tmp_path / "dist")])
    one_line(info)
    assert not (tmp_path / "dist").exists()


def test_make_synthetic_data_refuses_a_file_as_out(tmp_path):
    (tmp_path / "f").write_text("mine")
    done = subprocess.run([sys.executable, str(REPO / "make_synthetic_data.py"), "--out", str(tmp_path / "f"),
                           "--train", "1", "--validation", "0", "--test", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "is a file" in done.stderr, done.stderr
    assert (tmp_path / "f").read_text() == "mine"


# ---------------------------------------------------------------------------- exit 1 when files failed


def test_benchmark_names_the_images_it_could_not_score_and_exits_1(converted, tmp_path):
    from citytools.cli import benchmark

    data = labelled(tmp_path / "data", splits=("test",), per_label=5)
    (data / "test" / "0_pass" / "0.png").write_bytes(b"broken")
    (data / "test" / "1_ca" / "4.png").write_bytes(b"broken too")
    out = tmp_path / "b"
    card = shutil.copytree(converted["ca"], tmp_path / "card")
    with pytest.raises(UsageError, match="2 image"):  # the card would publish figures of a part as of the whole
        benchmark.main(["--model", str(converted["ca"]), "--dataset", str(data), "--out", str(out), "--no-baseline",
                        "--workers", "0", "--passes", "tiling", "--update-card", str(card)])
    assert benchmark.main(["--model", str(converted["ca"]), "--dataset", str(data), "--out", str(out),
                           "--no-baseline", "--workers", "0", "--passes", "tiling"]) == 1
    report = (out / "report.md").read_text()
    assert "8 images scored)" in report and "2 image(s) could not be scored" in report
    assert "0_pass/0.png" in report and "1_ca/4.png" in report
    assert len(json.loads((out / "metrics.json").read_text())["skipped"]) == 2


# -------------------------------------------------------------------------------------- classify corners


def test_classify_refuses_an_empty_range_skips_comments_and_keys_dataset_files(converted, tmp_path):
    from citytools.cli import classify

    with pytest.raises(SystemExit) as info:
        classify.parse_args(["x", "--out", "r.jsonl", "--label", "Pass", "--min", "0.9", "--max", "0.1"])
    assert info.value.code == 2
    images = folder_of_images(tmp_path / "in", {"a.png": 1, "b.png": 2})
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my picks\n{images / 'a.png'}\n  # {images / 'b.png'}\n\n")
    out = tmp_path / "r.jsonl"
    assert classify.main([f"@{listing}", "--model", str(converted["ca"]), "--out", str(out), "--workers", "0"]) == 0
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [str(images / "a.png")]
    data = labelled(tmp_path / "data", splits=("train",), per_label=2)
    (data / "train" / "metadata.csv").write_text("file_name,note\n0_pass/0.png,x\n0_pass/1.png,y\n1_ca/0.png,z\n"
                                                  "1_ca/1.png,w\n")
    scored = tmp_path / "scored.jsonl"  # an image folder whose metadata.csv has no label column
    assert classify.main(["--dataset", str(data), "--split", "train", "--model", str(converted["ca"]), "--out",
                          str(scored), "--workers", "0"]) == 0
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == ["0_pass/0.png#0", "0_pass/1.png#0", "1_ca/0.png#0", "1_ca/1.png#0"]
