"""convert_original.py: the three released kinds convert; every bad input is one line, exit 2, nothing written."""

import json

import pytest
import torch
from conftest import original_head_state, write_release
from safetensors.torch import save_file


def test_released_configs_become_labels_and_arch(converted):
    ca = json.loads((converted["ca"] / "config.json").read_text())
    comp = json.loads((converted["compression"] / "config.json").read_text())
    score = json.loads((converted["score"] / "config.json").read_text())
    assert ca["id2label"] == {"0": "Pass", "1": "Chromatic Aberration"} and ca["label_loss_weights"] == [1.0, 0.5]
    assert comp["id2label"] == {"0": "Pass", "1": "JPEG", "2": "WEBP"}
    assert comp["label_loss_weights"] == [1.0, 0.85, 0.65]
    assert score["arch"] == "score" and len(score["id2label"]) == 1
    assert json.loads((converted["score"] / "preprocessor_config.json").read_text())["tiling"] is False
    assert "Chromatic Aberration" in (converted["ca"] / "README.md").read_text()


def test_missing_config_names_classes_by_index(tmp_path, tiny_clip):
    from citytools.cli import convert_original

    head = write_release(tmp_path, "nameless", original_head_state(16, 32, 3, 5))
    assert convert_original.main(["--head", str(head), "--clip", str(tiny_clip), "--out", str(tmp_path / "o")]) == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2"} and config["head_hidden_size"] == 32


def test_float16_output(tmp_path, tiny_clip, releases):
    from safetensors import safe_open

    from citytools.cli import convert_original

    convert_original.main(["--head", str(releases["ca"]), "--clip", str(tiny_clip), "--out", str(tmp_path / "h"),
                           "--dtype", "float16"])
    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:  # the CLIP tower in float16; the head
        assert f.get_tensor("clip.visual_projection.weight").dtype == torch.float16  # stays float32 (see
        assert f.get_tensor("head.up.0.weight").dtype == torch.float32  # tests/test_precision.py)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["dtype"] == config["vision_config"]["dtype"] == "float16"


def test_card_and_config_hold_no_local_path_and_a_working_snippet(tmp_path, tiny_clip, releases):
    from huggingface_hub import ModelCard

    from citytools.cards import CLIP_BASE, base_model, hub_id
    from citytools.cli import convert_original

    out = tmp_path / "ca-v1.16"
    assert convert_original.main(["--head", str(releases["ca"]), "--clip", str(tiny_clip), "--out", str(out),
                                  "--repo-id", "me/ca-v1.16"]) == 0
    for name in ("config.json", "README.md"):
        assert str(tmp_path) not in (out / name).read_text() and str(tiny_clip) not in (out / name).read_text(), name
    card = ModelCard.load(out / "README.md")
    assert "custom_code" in card.data.tags and card.data.library_name == "transformers"
    assert 'pipeline("image-classification", model="me/ca-v1.16", trust_remote_code=True)' in card.text
    assert card.data.base_model is None  # a local CLIP folder: no Hub id to name
    assert hub_id("openai/clip-vit-large-patch14-336") and not hub_id(str(tiny_clip)) and not hub_id("./a/b")
    config = json.loads((out / "config.json").read_text())
    assert base_model({**config, "vision_config": {**config["vision_config"], "hidden_size": 1024}}) == CLIP_BASE
    assert base_model({"vision_config": {"_name_or_path": "someone/clip"}}) == "someone/clip"


def run_convert(capsys, *args):
    """(exit status, stderr) of the command line, run in this process: the script's `__main__` is
    `run_cli(main)`, and a fresh Python would spend seconds importing torch for each call."""
    from citytools.cli import convert_original
    from citytools.toolkit import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert_original.main, [str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def bad_inputs(tmp_path):
    wrong_keys = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 16)}, str(wrong_keys))
    not_st = tmp_path / "text.safetensors"
    not_st.write_text("hello")
    wide = write_release(tmp_path, "wide", original_head_state(768, 32, 2, 1))
    return {"missing": (tmp_path / "nope.safetensors", "no such file"),
            "not-safetensors": (not_st, "not a safetensors file"),
            "wrong-keys": (wrong_keys, "not a CityClassifiers head"),
            "feature-mismatch": (wide, "768-d")}


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, tiny_clip, capsys):
    from citytools.cli import convert_original
    from citytools.toolkit import UsageError

    for name, (head, message) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(UsageError, match=message) as error:
            convert_original.main(["--head", str(head), "--clip", str(tiny_clip), "--out", str(out)])
        assert str(head) in str(error.value) and "\n" not in str(error.value)
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*"))
    code, err = run_convert(capsys, "--head", tmp_path / "nope.safetensors", "--clip", tiny_clip,
                            "--out", tmp_path / "x")
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: ") and "nope.safetensors" in err
    assert run_convert(capsys, "--clip", tiny_clip)[0] == 2  # argparse: missing --head and --out


# -------------------------------------------------------------------------------- average_models.py


def test_average_models_interpolates_every_weight_and_refuses_another_architecture(converted, tmp_path, capsys):
    from safetensors.torch import load_file

    from citytools.cli import average_models
    from citytools.remote import CityClassifierForImageClassification
    from citytools.toolkit import UsageError

    moved = CityClassifierForImageClassification.from_pretrained(converted["ca"])
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(torch.randn_like(parameter))
    moved.save_pretrained(tmp_path / "moved")
    (tmp_path / "moved" / "preprocessor_config.json").write_text(
        (converted["ca"] / "preprocessor_config.json").read_text())
    out = tmp_path / "avg"
    assert average_models.main([str(converted["ca"]), str(tmp_path / "moved"), "--weight", "0.25",
                                "--out", str(out)]) == 0
    first = load_file(str(converted["ca"] / "model.safetensors"))
    second = load_file(str(tmp_path / "moved" / "model.safetensors"))
    averaged = load_file(str(out / "model.safetensors"))
    assert averaged.keys() == first.keys() == second.keys()
    for name, value in averaged.items():  # 3/4 of the first, 1/4 of the second
        torch.testing.assert_close(value.float(), 0.75 * first[name].float() + 0.25 * second[name].float())
    assert CityClassifierForImageClassification.from_pretrained(out).config.id2label[1] == "Chromatic Aberration"

    CityClassifierForImageClassification.from_pretrained(converted["ca"]).add_fringe_features().save_pretrained(
        tmp_path / "fringe")
    (tmp_path / "fringe" / "preprocessor_config.json").write_text(
        (converted["ca"] / "preprocessor_config.json").read_text())
    with pytest.raises(UsageError, match="differ in fringe_features"):
        average_models.main([str(converted["ca"]), str(tmp_path / "fringe"), "--out", str(tmp_path / "x")])
    # calibrated at another temperature: averaged all the same (SECOND's kept), with a warning to calibrate again
    moved.config.score_temperature = 3.0
    moved.save_pretrained(tmp_path / "moved")
    assert average_models.main([str(converted["ca"]), str(tmp_path / "moved"), "--out", str(tmp_path / "warm")]) == 0
    assert "calibrate it again" in capsys.readouterr().err
    assert CityClassifierForImageClassification.from_pretrained(tmp_path / "warm").config.score_temperature == 3.0
    moved.config.score_temperature, moved.config.score_bias = 1.0, [0.0, 0.7]  # a bias only: the same
    moved.save_pretrained(tmp_path / "moved")
    assert average_models.main([str(converted["ca"]), str(tmp_path / "moved"), "--out", str(tmp_path / "biased")]) == 0
    assert "different biases (None and [0.0, 0.7])" in capsys.readouterr().err
    assert CityClassifierForImageClassification.from_pretrained(tmp_path / "biased").config.score_bias == [0.0, 0.7]
    with pytest.raises(UsageError, match="not between 0 and 1"):
        average_models.main([str(converted["ca"]), str(tmp_path / "moved"), "--weight", "2",
                             "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_a_model_folder_only(converted, tmp_path):
    """--overwrite (average_models, convert_original, release) replaces an earlier output; a folder of
    other files named by mistake is refused with one line, every file kept."""
    from citytools.cli import average_models
    from citytools.toolkit import UsageError

    args = [str(converted["ca"]), str(converted["ca"]), "--out"]
    pictures = tmp_path / "Pictures"
    (pictures / "trip").mkdir(parents=True)
    (pictures / "trip" / "a.png").write_bytes(b"a picture")
    (pictures / "notes.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine too")
    for out, words in ((pictures, r"not a folder this tool wrote \(no config.json\)"), (a_file, "is a file")):
        with pytest.raises(UsageError, match=words) as info:
            average_models.main([*args, str(out), "--overwrite"])
        assert "\n" not in str(info.value)
    assert (pictures / "trip" / "a.png").read_bytes() == b"a picture" and a_file.read_text() == "mine too"
    earlier = tmp_path / "earlier"
    assert average_models.main([*args, str(earlier)]) == 0
    with pytest.raises(UsageError, match="pass --overwrite"):
        average_models.main([*args, str(earlier)])
    assert average_models.main([*args, str(earlier), "--overwrite"]) == 0  # an earlier output alone: replaced
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"does not write \(notes.txt\)"):  # with a file of someone else's: kept
        average_models.main([*args, str(earlier), "--overwrite"])
    assert (earlier / "config.json").is_file() and (earlier / "notes.txt").read_text() == "mine"
