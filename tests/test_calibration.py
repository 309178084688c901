"""Calibrated scores: a class model's temperature (config.score_temperature) divides its tile logits before
the softmax; train_hf.py fits it on the eval split by the likelihood of the combined scores."""

import json

import numpy as np
import pytest
import torch


def overconfident(n=4000, true_temperature=2.5, seed=0):
    """Tile log-probabilities of a model twice and a half too sure of itself: the labels are drawn
    from softmax(z / 2.5) while the model reports softmax(z). One tile each."""
    rng = np.random.default_rng(seed)
    z = torch.tensor(rng.normal(0, 4, (n, 1, 2)), dtype=torch.float32)
    truth = torch.softmax(z / true_temperature, -1)[:, 0, 1].numpy()
    labels = torch.tensor((rng.random(n) < truth).astype(np.int64))
    return torch.log_softmax(z, -1), torch.ones(n, 1, dtype=torch.bool), labels


@pytest.mark.parametrize("true_temperature", [2.5, 7.0])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(true_temperature):
    """7: a model fine-tuned from a calibrated one (stage 8 from stage 7's 3.6) can be that sure."""
    from citytools.training import TEMPERATURES, calibration_error, calibration_loss

    log_probs, mask, labels = overconfident(true_temperature=true_temperature)
    losses = [calibration_loss(log_probs, mask, labels, t, "mean") for t in TEMPERATURES]
    best = TEMPERATURES[int(np.argmin(losses))]
    assert best == pytest.approx(true_temperature, rel=0.12)
    assert calibration_loss(log_probs, mask, labels, best, "mean") < calibration_loss(log_probs, mask, labels, 1.0,
                                                                                        "mean")
    assert calibration_error(log_probs, mask, labels, best, "mean") < calibration_error(log_probs, mask, labels, 1.0,
                                                                                          "mean") / 2


def test_temperature_scales_the_tile_logits_and_one_changes_nothing(converted):
    from citytools.remote import CityClassifierConfig, CityClassifierForImageClassification

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    embeds = torch.randn(3, 5, model.config.vision_config.projection_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = model(image_embeds=embeds, tile_mask=mask)
        z = model.head(embeds)  # the head's tile logits, as the model's own forward makes them
        model.config.score_temperature = 2.0
        warm = model(image_embeds=embeds, tile_mask=mask)
    expected = torch.softmax(z / 2.0, -1).masked_fill(~mask.bool()[..., None], float("nan")).nanmean(1)
    assert torch.allclose(warm.scores, expected, atol=1e-6)
    assert torch.allclose(plain.scores, torch.softmax(z, -1).masked_fill(~mask.bool()[..., None], float("nan"))
                          .nanmean(1), atol=1e-6)
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="temperature"):
            CityClassifierConfig(score_temperature=bad)


def test_train_hf_calibrates_on_the_eval_split_and_saves_it(tmp_path):
    from citytools.cli import make_synthetic_data, train_hf

    data = tmp_path / "data"
    assert make_synthetic_data.main(["--out", str(data), "--train", "12", "--validation", "8", "--test", "0",
                                     "--seed", "2", "--workers", "1"]) == 0
    out = tmp_path / "model"
    vision = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "image_size": 30, "patch_size": 6, "projection_dim": 16})
    assert train_hf.main(["--dataset_name", str(data), "--output_dir", str(out), "--vision_config", vision,
                          "--head_hidden_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "4",
                          "--per_device_eval_batch_size", "4", "--disable_tqdm", "true", "--use_cpu", "true",
                          "--report_to", "none"]) == 0
    calibration = json.loads((out / "calibration.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert calibration["images"] == 8 and config["score_temperature"] == calibration["temperature"]
    assert calibration["nll"] <= calibration["nll_at_1"] + 1e-9  # the grid holds 1: never worse than none
    # no training steps: the same weights, calibrated again (how stage 8 was, after the grid grew)
    from safetensors.torch import load_file

    config["score_temperature"] = 40.0  # a stale temperature, far from what the eval split wants
    (out / "config.json").write_text(json.dumps(config))
    again = tmp_path / "again"
    assert train_hf.main(["--dataset_name", str(data), "--model_name_or_path", str(out), "--output_dir", str(again),
                          "--num_train_epochs", "0", "--per_device_eval_batch_size", "4", "--disable_tqdm", "true",
                          "--use_cpu", "true", "--report_to", "none"]) == 0
    before, after = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    recalibrated = json.loads((again / "config.json").read_text())["score_temperature"]
    assert recalibrated == json.loads((again / "calibration.json").read_text())["temperature"] != 40.0
    assert recalibrated == pytest.approx(calibration["temperature"], rel=1e-6)  # the temperature at 1 is refitted


def biased(n=6000, true_temperature=2.5, true_bias=1.2, seed=1):
    """Tile log-probabilities of a model too sure of itself and leaning to label 0, as one trained with
    label 1's loss halved: the labels are drawn from softmax(z / 2.5 + [0, 1.2]), the model reports
    softmax(z). One tile each."""
    rng = np.random.default_rng(seed)
    z = torch.tensor(rng.normal(0, 4, (n, 1, 2)), dtype=torch.float32)
    truth = torch.softmax(z / true_temperature + torch.tensor([0.0, true_bias]), -1)[:, 0, 1].numpy()
    labels = torch.tensor((rng.random(n) < truth).astype(np.int64))
    return torch.log_softmax(z, -1), torch.ones(n, 1, dtype=torch.bool), labels


class Predictions:
    """Stands for a model in fit_temperature: tile_predictions is replaced by fixed predictions."""

    def __init__(self, monkeypatch, predictions):
        from citytools import training

        monkeypatch.setattr(training, "tile_predictions", lambda model, loader: predictions)
        self.config = type("Config", (), {"tile_combine": "mean"})()


def test_the_fitted_bias_and_temperature_are_the_ones_the_labels_were_drawn_with(monkeypatch):
    """--calibrate_bias: Platt scaling recovers the bias the temperature alone cannot, and its scores'
    0.5 is where the labels are even; without it, the same predictions get no bias."""
    from citytools.training import fit_temperature

    log_probs, mask, labels = biased()
    model = Predictions(monkeypatch, (log_probs, mask, labels))
    plain = fit_temperature(model, None)
    fitted = fit_temperature(model, None, bias=True)
    assert plain["bias"] is None
    assert fitted["bias"][0] == 0.0 and fitted["bias"][1] == pytest.approx(1.2, abs=0.15)
    assert fitted["temperature"] == pytest.approx(2.5, rel=0.12)
    assert fitted["nll"] < plain["nll"]
    # restated by hand: the score of label 1 at the fitted temperature and bias
    z = log_probs[:, 0].numpy().astype(np.float64)
    s = 1 / (1 + np.exp(-((z[:, 1] - z[:, 0]) / fitted["temperature"] + fitted["bias"][1])))
    near = np.abs(s - 0.5) < 0.1
    assert abs(labels.numpy()[near].mean() - 0.5) < 0.06  # even odds around 0.5
    t = plain["temperature"]
    s_plain = 1 / (1 + np.exp(-((z[:, 1] - z[:, 0]) / t)))
    assert labels.numpy()[np.abs(s_plain - 0.5) < 0.1].mean() > 0.65  # the temperature alone: not even


def test_the_bias_is_added_to_the_scaled_tile_logits(converted):
    from citytools.remote import CityClassifierConfig, CityClassifierForImageClassification

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    embeds = torch.randn(3, 5, model.config.vision_config.projection_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        z = model.head(embeds)
        model.config.score_temperature, model.config.score_bias = 2.0, [0.0, 1.5]
        shifted = model(image_embeds=embeds, tile_mask=mask)
    tiles = torch.softmax(z / 2.0 + torch.tensor([0.0, 1.5]), -1)
    assert torch.allclose(shifted.scores, tiles.masked_fill(~mask.bool()[..., None], float("nan")).nanmean(1),
                          atol=1e-6)
    for bad in ([1.0], [0.0, float("inf")], "0,1", [0.0, True]):
        with pytest.raises(ValueError, match="score_bias"):
            CityClassifierConfig(score_bias=bad)
    with pytest.raises(ValueError, match="score_bias"):
        CityClassifierConfig(arch="score", score_bias=[0.5])


def test_train_hf_calibrate_bias_saves_it_and_a_temperature_only_recalibration_drops_it(tmp_path):
    from citytools.cli import make_synthetic_data, train_hf

    data = tmp_path / "data"
    assert make_synthetic_data.main(["--out", str(data), "--train", "12", "--validation", "8", "--test", "0",
                                     "--seed", "2", "--workers", "1"]) == 0
    vision = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "image_size": 30, "patch_size": 6, "projection_dim": 16})
    common = ["--per_device_eval_batch_size", "4", "--disable_tqdm", "true", "--use_cpu", "true", "--report_to", "none"]
    out = tmp_path / "model"
    assert train_hf.main(["--dataset_name", str(data), "--output_dir", str(out), "--vision_config", vision,
                          "--head_hidden_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "4",
                          "--calibrate_bias", "true", *common]) == 0
    calibration = json.loads((out / "calibration.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["score_bias"] == calibration["bias"] and len(config["score_bias"]) == 2
    assert calibration["bias"][0] == 0.0 and calibration["nll"] <= calibration["nll_at_1"] + 1e-9
    config["score_bias"] = [0.0, 3.0]  # a stale bias, far from what the eval split wants
    (out / "config.json").write_text(json.dumps(config))
    again = tmp_path / "again"
    assert train_hf.main(["--dataset_name", str(data), "--model_name_or_path", str(out), "--output_dir", str(again),
                          "--num_train_epochs", "0", *common]) == 0
    assert json.loads((again / "config.json").read_text())["score_bias"] is None
    # the temperature refitted from the scores without the old bias, as the first calibration saw them
    assert json.loads((again / "calibration.json").read_text())["nll_at_1"] == pytest.approx(calibration["nll_at_1"])
