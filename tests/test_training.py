"""Synthetic data generator, train_hf.py in both modes, the metric module, and dataset checks."""

import csv
import functools
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_image
from PIL import Image

TINY_VISION = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 30, "patch_size": 6, "projection_dim": 16})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from citytools.cli import make_synthetic_data

    out = tmp_path_factory.mktemp("synthetic") / "data"
    assert make_synthetic_data.main(["--out", str(out), "--train", "16", "--validation", "6", "--test", "4",
                                     "--seed", "3", "--workers", "2"]) == 0
    return out


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_generator_is_deterministic_and_labels_match_folders(synthetic, tmp_path):
    from citytools.cli import make_synthetic_data

    again = tmp_path / "again"
    make_synthetic_data.main(["--out", str(again), "--train", "16", "--validation", "6", "--test", "4",
                              "--seed", "3", "--workers", "1"])
    assert digest(again) == digest(synthetic)
    for split, count in (("train", 16), ("validation", 6), ("test", 4)):
        rows = list(csv.DictReader(open(synthetic / split / "metadata.csv")))
        assert len(rows) == count
        for row in rows:
            folder = row["file_name"].split("/")[0]
            assert folder == f"{row['label']}_{row['effect']}"
            assert (row["effect"] in make_synthetic_data.POSITIVES) == (row["label"] == "1")
            assert (float(row["strength"]) > 0) == (row["label"] == "1")
            assert (synthetic / split / row["file_name"]).is_file()


def test_generator_draws_only_the_chosen_hard_negatives():
    from citytools.cli import make_synthetic_data as m

    default = [effect for _, effect in m.plan("train", 400, 5, 0.2)]
    assert set(default) == set(m.POSITIVES) | set(m.NEGATIVES)  # every kind shows up by default
    chosen = [effect for _, effect in m.plan("train", 400, 5, 0.2, ("jpeg", "webp"))]
    assert set(chosen) == set(m.POSITIVES) | {"clean", "jpeg", "webp"}
    # the same draws, only the hard kinds renamed: positives and clean images stay where they were
    assert [e in m.POSITIVES or e == "clean" for e in chosen] == [e in m.POSITIVES or e == "clean" for e in default]
    for bad in (["--hard-negatives", "jpeg,blur"], ["--train", "-1"], ["--real-pictures", "1.5"]):
        with pytest.raises(SystemExit):
            m.parse_args(["--out", "x", *bad])


def test_more_geometries_and_resizing_leave_the_older_draws_where_they_were(tmp_path):
    """--more-geometries adds one-channel and green fringes without moving any other draw;
    --resized shrinks pictures by 0.25-0.75 from a stream of its own; --jpeg-quality lowers the range."""
    from PIL import Image

    from citytools.cli import make_synthetic_data as m

    default = m.plan("train", 400, 5, 0.4)
    more = m.plan("train", 400, 5, 0.4, positives=m.LABEL_1)
    assert {e for _, e in more} >= {"one_channel", "green"} and not {"one_channel", "green"} & {e for _, e in default}
    assert [(s, e in m.LABEL_1) for s, e in more] == [(s, e in m.POSITIVES) for s, e in default]  # same seeds, labels
    picture = Image.new("RGB", (800, 600), (10, 200, 30))
    factors = [m.resize_after(picture, seed, 0.5)[1] for seed in range(200)]
    assert 0.35 < np.mean([f < 1 for f in factors]) < 0.65
    assert all(0.25 <= f <= 0.75 for f in factors if f < 1)
    assert m.resize_after(picture, 3, 0.0) == (picture, 1.0)
    qualities = {m.deliver(picture, seed, "clean", 1.0, 60)[1] for seed in range(50)}
    assert qualities <= {"jpeg 4:2:0", "jpeg 4:4:4", "webp"}
    out = tmp_path / "data"
    assert m.main(["--out", str(out), "--train", "12", "--validation", "0", "--test", "0", "--seed", "4",
                   "--workers", "1", "--more-geometries", "--resized", "1.0"]) == 0
    rows = list(csv.DictReader(open(out / "train" / "metadata.csv")))
    assert all(row["label"] == str(int(row["effect"] in m.LABEL_1)) for row in rows)
    for row in rows:
        width = Image.open(out / "train" / row["file_name"]).width
        assert float(row["resized"]) < 1.0 or min(width, int(row["height"])) <= 128 * 4 / 3 + 1


def test_delivered_images_are_the_same_pictures_compressed_once_more(synthetic, tmp_path):
    from citytools.cli import make_synthetic_data as m

    delivered = tmp_path / "delivered"
    assert m.main(["--out", str(delivered), "--train", "16", "--validation", "6", "--test", "4", "--seed", "3",
                   "--workers", "1", "--delivered", "1"]) == 0
    seen = set()
    for split in ("train", "validation", "test"):
        plain = {r["file_name"]: r for r in csv.DictReader(open(synthetic / split / "metadata.csv"))}
        for row in csv.DictReader(open(delivered / split / "metadata.csv")):
            # the same draws as without --delivered: same files, effects and strengths
            assert {k: v for k, v in row.items() if k != "delivery"} == plain[row["file_name"]]
            before = np.asarray(Image.open(synthetic / split / row["file_name"]), np.float64)
            after = np.asarray(Image.open(delivered / split / row["file_name"]), np.float64)
            seen.add(row["delivery"])
            if row["effect"] in ("jpeg", "webp"):  # compressed already: left as they were
                assert row["delivery"] == "none" and (before == after).all()
            else:
                assert row["delivery"] in ("jpeg 4:2:0", "jpeg 4:4:4", "webp")
                assert before.shape == after.shape and (before != after).any()
                assert np.abs(before - after).mean() < 8  # quality 70-95: the picture, not a hard negative
    assert "none" in seen and len(seen) >= 3
    # about the asked share, JPEG the most common way, and nothing without the option
    kinds = [m.deliver(Image.new("RGB", (16, 16)), seed, "clean", 0.5)[1] for seed in range(600)]
    assert 0.4 < kinds.count("none") / 600 < 0.6
    assert kinds.count("jpeg 4:2:0") > kinds.count("webp") > 0 and kinds.count("jpeg 4:4:4") > 0
    assert "delivery" not in open(synthetic / "train" / "metadata.csv").readline()


def test_generated_shift_moves_red_and_blue_but_not_green():
    from citytools.cli import make_synthetic_data as m

    rng = np.random.default_rng(0)
    clean = m.draw_illustration(rng, 200, 150)
    shifted = np.asarray(m.channel_shift(clean, rng, 4.0)).astype(int)
    clean = np.asarray(clean).astype(int)
    assert (shifted[..., 1] == clean[..., 1]).all()
    assert np.abs(shifted[..., 0] - clean[..., 0]).mean() > 1 and np.abs(shifted[..., 2] - clean[..., 2]).mean() > 1


def train(tmp_path, synthetic, *extra):
    from citytools.cli import train_hf

    out = tmp_path / "model"
    args = ["--dataset_name", str(synthetic), "--output_dir", str(out), "--head_hidden_size", "32",
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--class_names", "Pass,Chromatic Aberration", "--disable_tqdm", "true", "--eval_strategy", "steps",
            "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--use_cpu", "true",
            "--logging_steps", "1",
            *extra]
    assert train_hf.main([str(a) for a in args]) == 0
    return out


def check_trained_folder(out):
    from transformers import pipeline

    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_cityclassifier.py",
                 "loss.csv", "loss.png", "highest_loss.csv"):
        assert (out / name).is_file(), name
    pipe = pipeline("image-classification", model=str(out), trust_remote_code=True)
    result = pipe(make_image(120, 90), top_k=None)
    assert {r["label"] for r in result} == {"Pass", "Chromatic Aberration"}
    worst = list(csv.DictReader(open(out / "highest_loss.csv")))
    assert worst and all(Path(row["path"]).is_file() for row in worst)


def test_full_mode_trains_backbone_and_saves_a_pipeline_folder(synthetic, tmp_path):
    out = train(tmp_path, synthetic, "--vision_config", TINY_VISION, "--cache_views", "2",
                "--label_loss_weights", "1.0,0.5")
    check_trained_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert config["label_loss_weights"] == [1.0, 0.5] and config["vision_config"]["hidden_size"] == 32


def test_head_mode_caches_embeddings_between_runs(synthetic, tiny_clip, tmp_path, monkeypatch):
    from citytools.remote import CityClassifierForImageClassification

    calls = []
    original = CityClassifierForImageClassification.get_image_features

    def counting(self, pixel_values):
        calls.append(len(pixel_values))
        return original(self, pixel_values)

    monkeypatch.setattr(CityClassifierForImageClassification, "get_image_features", counting)
    out = train(tmp_path / "a", synthetic, "--model_name_or_path", str(tiny_clip))
    first = sum(calls)
    assert first > 0
    check_trained_folder(out)
    frozen = CityClassifierForImageClassification.from_pretrained(out)
    from transformers import CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_clip)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(frozen.clip.state_dict()[name], tensor), f"{name} changed in head-only mode"
    calls.clear()
    train(tmp_path / "b", synthetic, "--model_name_or_path", str(tiny_clip))
    assert sum(calls) == 0, "the second run recomputed the cached embeddings"


def test_head_mode_trains_with_the_backbone_set_aside_and_saves_whole_checkpoints(synthetic, tiny_clip, tmp_path,
                                                                                   monkeypatch):
    """The frozen backbone leaves the module tree while Trainer steps (its walks of the whole model
    were most of a batch-1 step), but every checkpoint, the best model reloaded at the end, a resumed
    run and the final folder hold it whole: our loader refuses a checkpoint with a missing weight."""
    from transformers import CLIPVisionModelWithProjection, Trainer

    from citytools.remote import CityClassifierForImageClassification

    aside = []
    original = CityClassifierForImageClassification.forward

    @functools.wraps(original)  # Trainer reads the signature to find the labels
    def recording(self, *args, **kwargs):
        if self.training:
            aside.append(self._modules["clip"] is None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CityClassifierForImageClassification, "forward", recording)
    loads = []  # what Trainer found when it loaded a checkpoint into the model (resume, best model)
    monkeypatch.setattr(Trainer, "_issue_warnings_after_load", lambda self, result: loads.append(result))
    out = train(tmp_path, synthetic, "--model_name_or_path", str(tiny_clip))
    assert len(aside) == 4 and all(aside), "the backbone was in the module tree during head-only steps"
    train(tmp_path, synthetic, "--model_name_or_path", str(tiny_clip), "--max_steps", "6",
          "--resume_from_checkpoint", "last", "--activation_checkpointing", "true")  # no backbone to checkpoint: off
    assert len(aside) == 6 and all(aside)
    assert len(loads) >= 2, "neither the resume nor the best model went through Trainer's loading"
    assert all(not result.missing_keys and not result.unexpected_keys for result in loads), loads

    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_clip).state_dict()
    folders = sorted(out.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1])) + [out]
    assert len(folders) >= 3 and folders[-2].name == "checkpoint-6"
    heads = []
    for folder in folders:
        model = CityClassifierForImageClassification.from_pretrained(folder)  # refuses missing weights
        assert model.clip is not None
        for name, tensor in clip.items():
            assert torch.equal(model.clip.state_dict()[name], tensor), f"{folder.name}: {name}"
        heads.append(model.head.state_dict())
    assert any(not torch.equal(heads[0][k], heads[-2][k]) for k in heads[0]), "the head did not train"
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_resume_from_checkpoint(synthetic, tmp_path, monkeypatch):
    """A resumed run takes only the steps left (a restart would take all 6) and starts from the
    checkpoint's weights and history."""
    from transformers import Trainer

    out = train(tmp_path, synthetic, "--vision_config", TINY_VISION)
    assert (out / "checkpoint-4").is_dir()
    first = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    steps = []
    original = Trainer.training_step

    def counting(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counting)
    train(tmp_path, synthetic, "--vision_config", TINY_VISION, "--max_steps", "6", "--resume_from_checkpoint",
          "last")
    assert steps == [4, 5], steps  # global steps before each step taken: 5 and 6 only
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["log_history"][: len(first)] == first


def test_train_backbone_changes_the_backbone_and_head_only_does_not(synthetic, tiny_clip, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from citytools.remote import CityClassifierForImageClassification

    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_clip).state_dict()
    for flag, trains in (("true", True), ("false", False)):
        out = train(tmp_path / flag, synthetic, "--model_name_or_path", str(tiny_clip), "--train_backbone", flag,
                    "--learning_rate", "1e-3")
        trained = CityClassifierForImageClassification.from_pretrained(out).clip.state_dict()
        changed = [name for name, tensor in clip.items() if not torch.equal(trained[name], tensor)]
        if trains:
            assert len(changed) > len(clip) // 2, f"--train_backbone left most of the backbone as it was: {changed}"
        else:
            assert not changed, changed


def test_metric_module_matches_scikit_learn():
    import evaluate
    from sklearn import metrics

    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 200)
    p1 = np.clip(references * 0.3 + rng.random(200) * 0.7, 0, 1)
    scores = np.stack([1 - p1, p1], 1)
    predictions = scores.argmax(1)
    module = evaluate.load(str(REPO / "metrics" / "classification"))
    result = module.compute(predictions=predictions, references=references, scores=scores)
    assert result["accuracy"] == pytest.approx(metrics.accuracy_score(references, predictions))
    assert result["precision"] == pytest.approx(metrics.precision_score(references, predictions))
    assert result["recall"] == pytest.approx(metrics.recall_score(references, predictions))
    assert result["f1"] == pytest.approx(metrics.f1_score(references, predictions))
    assert result["roc_auc"] == pytest.approx(metrics.roc_auc_score(references, p1))
    assert result["pr_auc"] == pytest.approx(metrics.average_precision_score(references, p1))
    confidence = scores.max(1)
    bins = np.minimum((confidence * 10).astype(int), 9)  # an independent ECE: equal-width bins
    ece = sum(abs((predictions[bins == b] == references[bins == b]).mean() - confidence[bins == b].mean())
              * (bins == b).mean() for b in range(10) if (bins == b).any())
    assert result["ece"] == pytest.approx(ece, abs=1e-9)


def image_folder(root, layout):
    for relative, kind in layout.items():
        path = root / "train" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "bad":
            path.write_bytes(b"not a png")
        elif kind == "truncated":  # Pillow's verify() passes it; decoding fails
            data = io.BytesIO()
            make_image(80, 60, seed=1).save(data, "JPEG", quality=90)
            path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
        else:
            make_image(80, 60, seed=len(str(path))).save(path)
    return root


def test_unreadable_images_are_left_out_with_one_line_each_and_training_goes_on(tmp_path, capsys):
    from citytools.cli import train_hf

    layout = {"0_pass/a.png": "ok", "0_pass/b.png": "ok", "1_ca/c.png": "ok", "1_ca/d.png": "ok",
              "1_ca/e.png": "bad", "0_pass/f.jpg": "truncated"}
    data = image_folder(tmp_path / "data", layout)
    out = tmp_path / "o"
    args = ["--dataset_name", str(data), "--output_dir", str(out), "--vision_config", TINY_VISION, "--eval_split",
            "", "--max_steps", "2", "--head_hidden_size", "8", "--use_cpu", "true", "--report_to", "none",
            "--top_loss_images", "10"]
    for _ in range(2):  # the second run reads the outcome from datasets' cache: the same lines
        assert train_hf.main(args) == 1  # some images failed: exit 1, as classify.py
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 2 and all("left out" in line for line in errors), errors
        assert any("e.png: unreadable image" in line for line in errors)
        assert any("f.jpg: unreadable image (cannot decode" in line for line in errors)
        assert "note: 2 of the 6 images of split 'train' left out" in err
        with open(out / "highest_loss.csv") as f:  # every image trained on is listed: the four good ones
            assert sorted(Path(row["path"]).name for row in csv.DictReader(f)) == ["a.png", "b.png", "c.png", "d.png"]


@pytest.mark.parametrize("layout,message", [
    ({"0_pass/a.png": "ok", "1_ca/b.png": "bad", "1_ca/c.png": "truncated"}, "only label"),
    ({"0_pass/a.png": "ok", "0_pass/b.png": "ok"}, "only label"),
    ({"0_pass/a.png": "ok", "1_ca/b.png": "ok", "misc/c.png": "ok"}, "without a label id"),
], ids=["one-class-left", "one-class", "missing-label"])
def test_bad_datasets_fail_before_training(tmp_path, layout, message):
    from citytools.cli import train_hf
    from citytools.toolkit import UsageError

    data = image_folder(tmp_path / "data", layout)
    with pytest.raises(UsageError, match=message):
        train_hf.main(["--dataset_name", str(data), "--output_dir", str(tmp_path / "o"), "--vision_config",
                       TINY_VISION, "--eval_split", "", "--max_steps", "1"])


def test_full_mode_with_a_convolutional_stem(synthetic, tmp_path):
    vision = json.loads(TINY_VISION) | {"image_size": 15, "patch_size": 5}
    stem = json.dumps({"channels": [4, 4], "kernel_sizes": [3, 3], "strides": [1, 2]})
    out = train(tmp_path, synthetic, "--vision_config", json.dumps(vision), "--stem", stem, "--cache_views", "1",
                "--gradient_checkpointing", "true")  # the CLIP encoder's layers, as transformers does it
    check_trained_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert config["stem"]["channels"] == [4, 4] and config["stem_aux_loss_weight"] == 1.0
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"]["height"] == 30


def test_fine_tuning_adds_fringe_features_to_a_model_without_them(synthetic, converted, tmp_path):
    """The shipped model's stage 4: a CityClassifier fine-tuned with --fringe_features gets them,
    its head learns weights for them, and the folder scores through the pipeline."""
    from citytools.remote import FRINGE_FEATURES, CityClassifierForImageClassification

    head = json.loads((converted["ca"] / "config.json").read_text())["head_hidden_size"]  # the model's, kept
    out = train(tmp_path, synthetic, "--model_name_or_path", str(converted["ca"]), "--train_backbone", "true",
                "--fringe_features", "true", "--learning_rate", "0.01", "--label_loss_weights", "0.8,1.0",
                "--head_hidden_size", str(head))
    check_trained_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert json.loads((converted["ca"] / "config.json").read_text())["label_loss_weights"] != [0.8, 1.0]
    assert config["label_loss_weights"] == [0.8, 1.0]  # a training setting applies when fine-tuning too
    assert config["fringe_features"] == {"block": 48, "max_shift": 3, "min_edge": 0.02, "blocks": 12}
    model = CityClassifierForImageClassification.from_pretrained(out)
    projection = model.config.vision_config.projection_dim
    assert model.head.up[0].in_features == projection + len(FRINGE_FEATURES)
    assert model.head.up[0].weight[:, projection:].abs().sum() > 0  # trained away from the zero start


@pytest.mark.parametrize("option,value,message", [
    ("--head_hidden_size", "7", "head_hidden_size 64, which fine-tuning keeps"),
    ("--tile_combine", "max", "tile_combine mean, which fine-tuning keeps"),
    ("--arch", "score", "arch class, which fine-tuning keeps"),
    ("--label_loss_weights", "1,1,1", "2 positive numbers needed"),
])
def test_fine_tuning_refuses_head_settings_it_would_ignore(converted, tmp_path, option, value, message):
    from citytools.cli import train_hf
    from citytools.toolkit import UsageError

    _, model_args, _ = train_hf.parse_args(["--dataset_name", "d", "--output_dir", str(tmp_path),
                                            "--model_name_or_path", str(converted["ca"]), option, value])
    with pytest.raises(UsageError, match=message):
        train_hf.build_model(model_args, [0, 1], ["Pass", "Chromatic Aberration"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_bf16_on_a_cpu_only_machine_trains_on_the_cpu(synthetic, tmp_path, monkeypatch):
    """--bf16 on a machine without a GPU trains on the CPU under bf16 autocast (whether the CPU computes
    bf16 natively or not), and the model it trains scores the same in float32 and in bf16."""
    from citytools.cli import train_hf
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    _, _, training = train_hf.parse_args(["--dataset_name", "d", "--output_dir", str(tmp_path), "--bf16", "true"])
    assert training.bf16 and training.use_cpu
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"dataset_name": "d", "output_dir": str(tmp_path), "bf16": True}))
    _, _, training = train_hf.parse_args([str(config)])
    assert training.bf16 and training.use_cpu

    autocast = []
    original = CityClassifierForImageClassification.forward

    @functools.wraps(original)  # Trainer reads the signature to find the labels
    def recording(self, *args, **kwargs):
        if self.training:
            autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CityClassifierForImageClassification, "forward", recording)
    vision = json.loads(TINY_VISION) | {"image_size": 15, "patch_size": 5}
    stem = json.dumps({"channels": [4, 4], "kernel_sizes": [3, 3], "strides": [1, 2]})
    out = train(tmp_path / "run", synthetic, "--vision_config", json.dumps(vision), "--stem", stem, "--bf16", "true",
                "--learning_rate", "1e-3")
    assert autocast and set(autocast) == {(True, torch.bfloat16)}, autocast
    processor = CityClassifierImageProcessor.from_pretrained(out)
    inputs = processor(images=[make_image(120 + 7 * i, 90, seed=i) for i in range(8)], return_tensors="pt")
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = CityClassifierForImageClassification.from_pretrained(out, dtype=dtype).eval()
        with torch.inference_mode():
            scores[dtype] = model(**inputs).scores[:, 1]
    assert (scores[torch.bfloat16] - scores[torch.float32]).abs().max() <= 1e-2, scores
    assert torch.equal(scores[torch.bfloat16] >= 0.5, scores[torch.float32] >= 0.5)


def test_bf16_auto_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    from citytools import devices
    from citytools.cli import train_hf

    config = tmp_path / "args.json"
    config.write_text(json.dumps({"dataset_name": "d", "output_dir": str(tmp_path), "bf16": "auto"}))
    for native in (False, True):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda native=native: native)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        for argv in ([str(config)], ["--dataset_name", "d", "--output_dir", str(tmp_path), "--bf16", "auto"],
                     ["--dataset_name", "d", "--output_dir", str(tmp_path), "--bf16=auto"]):
            training = train_hf.parse_args(argv)[2]
            assert training.bf16 is native and training.use_cpu is native, (native, argv)
    for name in ("default_model.json", "default_model_stage2.json", "default_model_stage3.json"):
        assert json.loads((REPO / "configs" / name).read_text())["bf16"] == "auto"


def test_training_arguments_that_do_not_fit_are_one_line_or_give_way_with_a_note(tmp_path, capsys):
    """load_best_model_at_end is this tool's default, not the user's: it gives way to save and
    evaluation strategies that do not match it. TrainingArguments' refusals are one-line errors."""
    from citytools.cli import train_hf
    from citytools.toolkit import UsageError

    base = ["--dataset_name", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"]
    _, _, training = train_hf.parse_args([*base, "--eval_strategy", "steps", "--save_strategy", "no"])
    assert not training.load_best_model_at_end and "best checkpoint is not loaded" in capsys.readouterr().err
    _, _, training = train_hf.parse_args(base)
    assert training.load_best_model_at_end and training.metric_for_best_model == "roc_auc"
    refused = {"load_best_model_at_end requires the save and eval strategy to match":
               ["--eval_strategy", "steps", "--save_strategy", "no", "--load_best_model_at_end", "true"],
               "requires non-zero --logging_steps": ["--logging_steps", "0"]}
    for words, bad in refused.items():
        with pytest.raises(UsageError, match=words) as info:
            train_hf.parse_args([*base, *bad])
        assert "\n" not in str(info.value)
    _, _, training = train_hf.parse_args([*base, "--metric_for_best_model", "loss"])
    assert training.metric_for_best_model == "loss" and not training.greater_is_better  # the user's choice stands
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dataset_name": str(tmp_path), "output_dir": str(tmp_path / "o"), "use_cpu": True,
                                  "eval_strategy": "steps", "save_strategy": "no"}))
    _, _, training = train_hf.parse_args([str(config)])
    assert not training.load_best_model_at_end


def test_push_to_hub_is_checked_before_any_data_is_read(tmp_path):
    from citytools.cli import train_hf
    from citytools.toolkit import UsageError

    with pytest.raises(UsageError, match="--push_to_hub: the Hub is switched off"):  # tests run offline
        train_hf.main(["--dataset_name", str(tmp_path / "no-such-data"), "--output_dir", str(tmp_path / "o"),
                       "--vision_config", TINY_VISION, "--push_to_hub", "true"])


def test_checkpoints_hold_the_processor_and_load_in_a_pipeline(synthetic, tmp_path):
    from transformers import pipeline

    out = train(tmp_path, synthetic, "--vision_config", TINY_VISION)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "preprocessor_config.json").is_file()
    pipe = pipeline("image-classification", model=str(checkpoint), trust_remote_code=True)
    assert {r["label"] for r in pipe(make_image(120, 90), top_k=None)} == {"Pass", "Chromatic Aberration"}


def tiny_class_model(seed, size=30):
    """A random tiny CityClassifier (class model, no dropout, no stem) and a processor for it."""
    from transformers import CLIPVisionConfig

    from citytools.remote import (
        CityClassifierConfig,
        CityClassifierForImageClassification,
        CityClassifierImageProcessor,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**(json.loads(TINY_VISION) | {"image_size": size}))
    config = CityClassifierConfig(vision_config=vision, arch="class", head_hidden_size=16, head_dropout=0.0,
                                  id2label={0: "Pass", 1: "Chromatic Aberration"}, label_loss_weights=[1.0, 0.5])
    processor = CityClassifierImageProcessor(tiling=True, size={"shortest_edge": size},
                                             crop_size={"height": size, "width": size})
    return CityClassifierForImageClassification(config), processor


def test_distillation_adds_the_cross_entropy_against_the_teachers_pooled_log_odds(tmp_path):
    """Restated by hand: label loss (weighted NLL) + weight x the cross-entropy against
    sigmoid(sum_i w_i log-odds_i) of the teachers; evaluation keeps the labels' loss only."""
    from transformers import TrainingArguments

    from citytools.training import DistillingTrainer

    student, _ = tiny_class_model(0)
    teachers = [tiny_class_model(seed)[0] for seed in (1, 2)]
    for teacher, temperature in zip(teachers, (1.0, 3.0)):  # a calibrated teacher's temperature applies
        teacher.config.score_temperature = temperature
    weights, distill = [0.25, 0.75], 2.0
    trainer = DistillingTrainer(model=student, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                                teachers=teachers, teacher_weights=weights, distill_loss_weight=distill)
    torch.manual_seed(5)
    inputs = {"pixel_values": torch.randn(4, 2, 3, 30, 30), "tile_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]]),
              "labels": torch.tensor([0, 1, 1, 0])}
    student.train()
    loss = trainer.compute_loss(student, dict(inputs)).item()

    def ca_score(model):  # the combined score of label 1: tile probabilities at the temperature, averaged
        with torch.no_grad():
            z = model(pixel_values=inputs["pixel_values"], tile_mask=inputs["tile_mask"]).tile_scores
        return np.array([z[i, : int(inputs["tile_mask"][i].sum()), 1].mean().item() for i in range(4)], np.float64)

    s = ca_score(student)
    label_weight = np.where(inputs["labels"].numpy() == 1, 0.5, 1.0)
    nll = -(label_weight * np.log(np.where(inputs["labels"].numpy() == 1, s, 1 - s))).sum() / label_weight.sum()
    log_odds = sum(w * np.log(t / (1 - t)) for w, t in zip(weights, map(ca_score, teachers)))
    p = 1 / (1 + np.exp(-log_odds))
    cross_entropy = -(p * np.log(s) + (1 - p) * np.log(1 - s)).mean()
    assert loss == pytest.approx(nll + distill * cross_entropy, rel=1e-5)
    assert abs(distill * cross_entropy) > 0.1  # the distillation term is not negligible here
    student.eval()
    assert trainer.compute_loss(student, dict(inputs)).item() == pytest.approx(nll, rel=1e-5)


def test_train_hf_distils_from_teachers_that_read_the_same_inputs(synthetic, tmp_path, caplog):
    teacher, processor = tiny_class_model(1)
    teacher.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    caplog.set_level("INFO", logger="train_hf")
    out = train(tmp_path, synthetic, "--vision_config", TINY_VISION, "--cache_views", "1",
                "--distill_from", f"{tmp_path / 'teacher'},{tmp_path / 'teacher'}", "--distill_weights", "0.5,0.2")
    check_trained_folder(out)
    assert "distilling from" in caplog.text and "weights 0.5, 0.2" in caplog.text
    assert not any("teacher" in key for key in json.loads((out / "config.json").read_text()))


@pytest.mark.parametrize("extra, message", [
    (["--distill_from", "{teacher42}"], "reads other inputs than the model being trained (size, crop_size differ)"),
    (["--distill_from", "{teacher}", "--distill_weights", "1,2"], "one number per teacher (1)"),
    (["--distill_weights", "1"], "--distill_weights needs --distill_from"),
    (["--distill_from", "{teacher}", "--train_backbone", "false"], "class models in full mode only"),
    (["--calibrate_bias", "true", "--calibrate", "false"], "it needs --calibrate"),
    (["--native_dropout", "0.3"], "--native_dropout needs a model with native-resolution inputs"),
    (["--native_fringes", "true", "--native_dropout", "1.5"], "--native_dropout must be in [0, 1)"),
])
def test_train_hf_refuses_teachers_and_calibration_it_cannot_use(synthetic, tmp_path, extra, message):
    from citytools.toolkit import UsageError

    for name, size in (("teacher", 30), ("teacher42", 42)):
        teacher, processor = tiny_class_model(1, size)
        teacher.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    extra = [a.format(teacher=tmp_path / "teacher", teacher42=tmp_path / "teacher42") for a in extra]
    with pytest.raises(UsageError) as error:
        train(tmp_path, synthetic, "--vision_config", TINY_VISION, *extra)
    assert message in str(error.value)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.json")))
def test_every_documented_config_parses(config):
    """Each configs/*.json is a train_hf.py command line: every key an option it knows."""
    from citytools.cli import train_hf

    data, model, training = train_hf.parse_args([str(REPO / "configs" / config)])
    assert data.dataset_name and training.output_dir.startswith("runs/")
