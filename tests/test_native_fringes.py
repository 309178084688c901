"""native_fringes.py, fringes measured over the whole picture at its own resolution: known shifts are
recovered, clean pictures measure near zero, every geometry shows in its own measurement, and the
classical yardstick built on it ranks aberrated pictures above clean ones."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def illustration(seed, width=1200, height=900):
    from citytools.drawing import draw_illustration

    return draw_illustration(np.random.default_rng(seed), width, height)


def moved(image, red=(0, 0), green=(0, 0), blue=(0, 0)):
    """The picture with each channel moved by (dx, dy) px: PIL's bicubic affine transform with the
    edges replicated (citytools.aberrations.shift_channel, the generator's own), nothing of the
    measurement's code."""
    from citytools.aberrations import shift_channel

    channels = [shift_channel(c, *d) if d != (0, 0) else c for c, d in zip(image.split(), (red, green, blue))]
    return Image.merge("RGB", channels)


def stripes(seed, width=320, height=256):
    """Horizontal bands of random colours, 2-9 px tall: every edge runs across the picture, so a
    block's correlation is the same at every horizontal shift (a plateau), and only the vertical one
    is measurable."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(rng.integers(0, 256, (height, 3)), rng.integers(2, 10, height), axis=0)[:height]
    return Image.fromarray(np.repeat(rows[:, None].astype(np.uint8), width, axis=1))


def native_module():
    import importlib

    import citytools.remote  # noqa: F401 - makes the remote-code files the `cityclassifier` package

    return importlib.import_module("cityclassifier.native_fringes")


def features(image, **spec):
    from citytools.remote import NATIVE_FRINGE_FEATURES, measure_fringes

    return dict(zip(NATIVE_FRINGE_FEATURES, measure_fringes(image, spec or None).tolist()))


def red_offsets(image):
    from cityclassifier.native_fringes import block_offsets, native_fringe_spec, work_image

    pixels, _ = work_image(image, 2048)
    red, blue, *_ = block_offsets(pixels, native_fringe_spec(True))
    return red, blue


@pytest.mark.parametrize("shift", [(1.0, 0.0), (0.0, -2.0), (3.0, 2.0), (-0.5, 0.0), (0.0, 1.5)])
def test_a_known_shift_is_recovered_within_a_fifth_of_a_pixel(shift):
    dx, dy = shift
    red, blue = red_offsets(moved(illustration(0), red=shift))
    assert len(red) >= 60  # measured all over the picture, not in a few blocks
    median_dy, median_dx = np.median(red, axis=0)
    assert abs(median_dx - dx) <= 0.2 and abs(median_dy - dy) <= 0.2, (median_dx, median_dy)
    assert np.abs(np.median(blue, axis=0)).max() <= 0.05  # blue stayed where it was


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_clean_picture_measures_near_zero(seed):
    clean = features(illustration(seed))
    for name in ("red_px", "blue_px", "apart_px", "together_px"):
        assert clean[name] < 0.05, (name, clean[name])
    shifted = features(moved(illustration(seed), red=(1.0, 0.0), blue=(-1.0, 0.0)))
    assert shifted["fringe_px"] > clean["fringe_px"] + 1.0
    assert abs(shifted["apart_px"] - 2.0) < 0.2 and clean["scale"] == shifted["scale"] == 1.0


def test_each_geometry_shows_in_its_own_measurement():
    picture = illustration(3)
    green = features(moved(picture, green=(1.5, 0.0)))  # green against magenta: red and blue together
    assert abs(green["together_px"] - 1.5) < 0.2 and green["apart_px"] < 0.1
    one = features(moved(picture, blue=(0.0, 2.0)))  # one channel
    assert abs(one["blue_px"] - 2.0) < 0.2 and one["red_px"] < 0.1
    from citytools.aberrations import radial_aberration

    radial = features(radial_aberration(picture, np.random.default_rng(0), 3.0))  # grows from the centre
    whole = features(moved(picture, red=(1.5, 0.0), blue=(-1.5, 0.0)))  # one shift of the whole picture
    assert radial["radial_px"] > 1.0 and radial["radial_px"] > 2 * radial["coherent_px"]
    assert whole["coherent_px"] > 2.5 and whole["coherent_px"] > 2 * whole["radial_px"]


def test_a_large_picture_is_measured_at_the_work_size():
    large = illustration(4, 1800, 1350).resize((4096, 3072), Image.LANCZOS)
    found = features(moved(large, red=(4.0, 0.0)))
    assert found["scale"] == pytest.approx(2048 / 4096)
    assert abs(found["red_px"] - 4.0 * found["scale"]) < 0.2  # 4 px native are 2 px at 2048 wide
    native = features(moved(large, red=(4.0, 0.0)), work_side=4096)
    assert native["scale"] == 1.0 and abs(native["red_px"] - 4.0) < 0.25


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "1", "CMYK"])
def test_any_mode_and_tiny_or_flat_pictures_give_finite_numbers(mode):
    picture = illustration(5, 300, 200).convert(mode)
    assert all(math.isfinite(v) for v in features(picture).values())
    for blank in (Image.new("RGB", (3, 3)), Image.new("RGB", (500, 400), (120, 30, 200))):
        found = features(blank)
        assert found["fringe_px"] == 0.0 and found["edge_share"] == 0.0


@pytest.mark.parametrize("bad", [{"block": 4}, {"max_shift": 20}, {"colour": 1}, "yes", {"grid": 0}])
def test_settings_are_checked(bad):
    from cityclassifier.native_fringes import native_fringe_spec

    with pytest.raises(ValueError, match="native_fringes"):
        native_fringe_spec(bad)


def test_the_yardstick_ranks_every_geometry_above_the_clean_pictures():
    from citytools.aberrations import radial_aberration
    from citytools.baseline import FringeBaseline

    baseline = FringeBaseline()
    rng = np.random.default_rng(7)
    clean = [illustration(seed, 640, 480) for seed in range(10, 14)]
    aberrated = [moved(clean[0], red=(2.0, 0.0)), moved(clean[1], red=(1.0, 1.0), blue=(-1.0, -1.0)),
                 moved(clean[2], green=(0.0, 2.0)), radial_aberration(clean[3], rng, 4.0)]
    clean_scores = [baseline(p)["Chromatic Aberration"] for p in clean]
    aberrated_scores = [baseline(p)["Chromatic Aberration"] for p in aberrated]
    assert max(clean_scores) < 0.5 < min(aberrated_scores), (clean_scores, aberrated_scores)


# ----------------------------------------------------------------------------- the model's own input


def tiny_native_model(tmp_path, converted):
    """The converted test model (per-view fringes off), given the native measurements with zero
    weights, saved with a processor that measures them."""
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"])
    return model, processor


def test_processor_and_model_contract_with_and_without_measurements(converted, tmp_path):
    import torch

    from citytools.remote import NATIVE_FRINGE_FEATURES

    model, processor = tiny_native_model(tmp_path, converted)
    pictures = [illustration(20, 150, 100), moved(illustration(21, 130, 90), red=(2.0, 0.0))]
    plain = processor(pictures, return_tensors="pt")
    assert "fringe_values" not in plain and "fringe_values" not in processor.model_input_names
    with torch.no_grad():
        before = model(**plain).scores
        model.add_native_fringes()
        measuring = processor.with_options(native_fringes=True)
        inputs = measuring(pictures, return_tensors="pt")
        assert inputs["fringe_values"].shape == (2, len(NATIVE_FRINGE_FEATURES))
        assert inputs["fringe_values"].dtype == torch.float32 and "fringe_values" in measuring.model_input_names
        expected = [features(p) for p in pictures]  # the measurement on each picture as given
        assert inputs["fringe_values"][:, 0].tolist() == pytest.approx([e["fringe_px"] for e in expected], abs=1e-6)
        assert torch.allclose(model(**inputs).scores, before, atol=1e-6)  # zero weights: as before until trained
        model.head.up[0].weight[:, -len(NATIVE_FRINGE_FEATURES):] = 1.0  # now they count
        assert not torch.allclose(model(**inputs).scores, before)
        with pytest.raises(ValueError, match="pass fringe_values"):
            model(**plain)
        with pytest.raises(ValueError, match=r"fringe_values must be \(batch, 13\)"):
            model(**{**inputs, "fringe_values": inputs["fringe_values"][:, :5]})


def test_the_patches_are_the_most_edge_rich_blocks_unresized():
    """fringe_patches: blocks cut from the picture as it is (work size up to 2048 px), the ones with
    the strongest green edges of their part of the picture; repeats when few have edges, zeros when
    none has. Checked against blocks and edge strengths computed here."""
    from citytools.remote import measure_native

    spec = {"count": 8, "size": 32, "channels": 4}
    picture = illustration(40, 320, 256)  # 10 x 8 blocks of 32, a 4 x 4 grid of cells: 4 or 6 blocks a cell
    pixels = np.asarray(picture)
    _, patches = measure_native(picture, None, spec)
    assert patches.shape == (8, 3, 32, 32) and patches.dtype == np.uint8
    blocks = {(r, c): pixels[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].transpose(2, 0, 1)
              for r in range(8) for c in range(10)}
    green = {key: block[1].astype(float) for key, block in blocks.items()}
    strength = {key: np.abs(np.diff(g, axis=0)).sum() + np.abs(np.diff(g, axis=1)).sum() for key, g in green.items()}
    found = [next(key for key, block in blocks.items() if np.array_equal(block, patch)) for patch in patches]
    assert len(set(found)) == 8  # eight different blocks, each exactly as in the picture
    assert np.mean([strength[k] for k in found]) > np.percentile(list(strength.values()), 75)
    flat = Image.new("RGB", (300, 200), (120, 80, 200))
    assert not measure_native(flat, None, spec)[1].any()  # no edges: no evidence, zeros
    one_edge = np.full((64, 256, 3), 40, np.uint8)
    one_edge[:, 100:] = 220  # one block column with an edge, per row of blocks
    few = measure_native(Image.fromarray(one_edge), None, spec)[1]
    assert len({p.tobytes() for p in few}) < 8 and all(p.std() > 0 for p in few)  # the edged blocks, repeated
    large = illustration(41, 4096, 3072)
    _, halved = measure_native(large, None, spec)
    work = np.asarray(large.resize((2048, 1536), Image.BOX)).transpose(2, 0, 1)
    for patch in halved[:2]:  # the work-size picture's blocks (box-downscaled once, as the measurement reads it)
        assert any(np.array_equal(patch, work[:, r : r + 32, c : c + 32]) for r in range(0, 1536, 32)
                   for c in range(0, 2048, 32))


def test_patch_stream_contract(converted, tmp_path):
    """--native_patches' model input: zero head weights score as before, the patch stream changes the
    scores once they count, wrong or missing patches are refused by name, and a saved model loads
    strictly with the stream in float32 whatever dtype it is loaded in."""
    import torch

    from citytools.remote import CityClassifierForImageClassification

    model, processor = tiny_native_model(tmp_path, converted)
    with pytest.raises(ValueError, match="native_patches needs native_fringes"):
        model.add_native_patches()
    with pytest.raises(ValueError, match="native_patches needs native_fringes"):
        processor.with_options(native_patches=True)
    model.add_native_fringes()
    spec = {"count": 4, "size": 16, "channels": 3}
    processor = processor.with_options(native_fringes=True, native_patches=spec)
    pictures = [illustration(50, 150, 100), moved(illustration(51, 130, 90), red=(2.0, 0.0))]
    inputs = processor(pictures, return_tensors="pt")
    assert inputs["fringe_patches"].shape == (2, 4, 3, 16, 16) and inputs["fringe_patches"].dtype == torch.uint8
    assert processor.model_input_names[-2:] == ["fringe_values", "fringe_patches"]
    with torch.no_grad():
        before = model(**inputs).scores
        model.add_native_patches(spec)
        assert torch.equal(model(**inputs).scores, before)  # zero weights: as before until trained
        model.head.up[0].weight[:, -24:] = 0.5
        after = model(**inputs).scores
        assert not torch.allclose(after, before)
        with pytest.raises(ValueError, match="pass fringe_patches"):
            model(**{k: v for k, v in inputs.items() if k != "fringe_patches"})
        with pytest.raises(ValueError, match=r"fringe_patches must be uint8 \(2, 4, 3, 16, 16\)"):
            model(**{**inputs, "fringe_patches": inputs["fringe_patches"].float()})
    model.save_pretrained(tmp_path / "m")
    loaded = CityClassifierForImageClassification.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    assert loaded.config.native_patches == spec and loaded.patch_stream.layers[0].weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).scores, after, atol=0.02)  # only CLIP's tower in bf16


def test_patch_stream_pools_as_its_docstring_says():
    """The patch stream against a plain statement of it: red - green and blue - green (x4) and green,
    its layers, then each map's mean and largest value over the patch, then the mean and the largest
    over the patches. Channels-last maps and a whole-map max-pool (its speed) must give these numbers."""
    import torch

    from citytools.remote import CityClassifierPatchStream

    torch.manual_seed(0)
    stream = CityClassifierPatchStream({"count": 5, "size": 16, "channels": 4}).eval()
    patches = torch.randint(0, 256, (3, 5, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        x = patches.flatten(0, 1).double() / 255
        x = torch.stack([(x[:, 0] - x[:, 1]) * 4, (x[:, 2] - x[:, 1]) * 4, x[:, 1]], dim=1)
        maps = stream.layers.double()(x)  # (15, 8, 16, 16), plain layout, float64
        flat = maps.reshape(3, 5, 8, -1)
        per_patch = torch.cat([flat.mean(-1), flat.max(-1).values], dim=-1)  # (3, 5, 16)
        expected = torch.cat([per_patch.mean(1), per_patch.max(1).values], dim=1)
        got = stream.float()(patches)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[:, 8:16], expected[:, :8])  # the largest values are not the means


def test_size_features_contract(converted, tmp_path):
    """native_fringes' `size`: the processor appends the picture's long side (in 256 px) and the blocks
    measured (in 32) to the measurements; `add_native_size` gives them zero head weights between the
    measurements and the patch stream's features, so the model scores as before until trained; then
    they count, a model without them is refused them, and the setting survives a save and load."""
    import torch

    from citytools.remote import NATIVE_FRINGE_FEATURES, CityClassifierForImageClassification

    model, processor = tiny_native_model(tmp_path, converted)
    with pytest.raises(ValueError, match="size features need native_fringes"):
        model.add_native_size()
    with pytest.raises(ValueError, match="size must be true or false"):
        native_module().native_fringe_spec({"size": "yes"})
    model.add_native_fringes()
    spec = {"count": 4, "size": 16, "channels": 3}
    model.add_native_patches(spec)
    with torch.no_grad():
        model.head.up[0].weight[:, -(len(NATIVE_FRINGE_FEATURES) + 24):] = 0.25  # measurements and stream count
    pictures = [illustration(60, 171, 128), moved(illustration(61, 640, 400), red=(2.0, 0.0))]
    plain = processor.with_options(native_fringes=True, native_patches=spec)(pictures, return_tensors="pt")
    sized = processor.with_options(native_fringes={"size": True}, native_patches=spec)(pictures, return_tensors="pt")
    n = len(NATIVE_FRINGE_FEATURES)
    assert sized["fringe_values"].shape == (2, n + 2)
    assert torch.equal(sized["fringe_values"][:, :n], plain["fringe_values"])
    assert torch.equal(sized["fringe_patches"], plain["fringe_patches"])
    # by hand: 171 px and 640 px long sides; blocks of 32 px: 5 x 4 and 20 x 12 in the picture, of which the
    # measured ones are at most all of them (and at most 8 a cell of the 4 x 4 grid)
    assert sized["fringe_values"][:, n].tolist() == pytest.approx([171 / 256, 640 / 256])
    measured = (sized["fringe_values"][:, n + 1] * 32).tolist()
    assert measured == [round(m) for m in measured] and 0 < measured[0] <= 20 and 20 < measured[1] <= 128
    with torch.no_grad():
        before = model(**plain).scores
        with pytest.raises(ValueError, match=r"fringe_values must be \(batch, 13\)"):
            model(**sized)
        model.add_native_size()
        assert model.config.native_fringes["size"] is True
        assert torch.allclose(model(**sized).scores, before, atol=1e-6)  # zero weights in place: as before
        with pytest.raises(ValueError, match=r"fringe_values must be \(batch, 15\)"):
            model(**plain)
        model.head.up[0].weight[:, -26:-24] = 1.0  # the size features' columns, before the stream's 24
        after = model(**sized).scores
        assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path / "m")
    loaded = CityClassifierForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.native_fringes["size"] is True
    with torch.no_grad():
        assert torch.equal(loaded(**sized).scores, after)


@pytest.mark.parametrize("patches", [False, True], ids=["measurements", "measurements+patches"])
def test_pipeline_classify_and_the_engine_give_the_same_numbers(converted, tmp_path, patches):
    """A saved model with native fringes (and the patch stream): the pipeline by path, the Scorer
    (classify.py's and benchmark.py's engine, decoding workers and all) and a hand-made forward agree."""
    import torch
    from transformers import pipeline

    from citytools.cli import classify
    from citytools.scorer import Scorer

    model, processor = tiny_native_model(tmp_path, converted)
    model.add_native_fringes()
    if patches:
        model.add_native_patches({"count": 6, "size": 16, "channels": 4})
    with torch.no_grad():
        model.head.up[0].weight[:, -13 - 32 * patches:] = torch.linspace(-2, 2, 13 + 32 * patches)
    processor = processor.with_options(native_fringes=True, native_patches=model.config.native_patches)
    folder = tmp_path / "native-model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i, picture in enumerate([illustration(30, 200, 140), moved(illustration(31, 180, 120), blue=(0, 3.0)),
                                 illustration(32, 60, 50)]):
        picture.save(pictures / f"{i}.png")
    pipe = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    by_pipeline = {p.name: {r["label"]: r["score"] for r in pipe(str(p), top_k=None)}
                   for p in sorted(pictures.iterdir())}
    with torch.no_grad():
        by_hand = {p.name: model(**processor(Image.open(p), return_tensors="pt")).scores[0, 1].item()
                   for p in sorted(pictures.iterdir())}
    out = tmp_path / "scores.jsonl"
    assert classify.main([str(pictures), "--model", str(folder), "--out", str(out), "--workers", "1"]) == 0
    import json

    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    column = next(c for c in rows["0.png"] if c.endswith(":Chromatic Aberration"))
    for name, scores in by_pipeline.items():
        assert scores["Chromatic Aberration"] == pytest.approx(by_hand[name], abs=1e-5)
        assert rows[name][column] == pytest.approx(by_hand[name], abs=1e-5)
    assert len(set(round(v, 4) for v in by_hand.values())) == 3
    option = "native_patches" if patches else "native_fringes"
    type(processor)(**{**processor.to_dict(), option: None}).save_pretrained(folder)  # one that does not make them
    with pytest.raises(ValueError, match=f"reads {option} .* its processor makes None"):
        Scorer([str(folder)])


@pytest.mark.parametrize("flag", ["--native_fringes", "--native_patches", "--native_size"])
def test_train_hf_native_inputs_train_and_refuse_head_only(converted, tmp_path, flag):
    import json

    import torch

    from citytools.cli import make_synthetic_data, train_hf
    from citytools.remote import CityClassifierForImageClassification
    from citytools.toolkit import UsageError

    data = tmp_path / "data"
    assert make_synthetic_data.main(["--out", str(data), "--train", "12", "--validation", "4", "--test", "0",
                                     "--seed", "5", "--workers", "1", "--more-geometries", "--resized", "0.5"]) == 0
    out = tmp_path / "model"
    common = ["--dataset_name", str(data), "--model_name_or_path", str(converted["ca"]), flag, "true",
              "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
              "--class_names", "Pass,Chromatic Aberration", "--disable_tqdm", "true", "--use_cpu", "true",
              "--learning_rate", "0.05", "--report_to", "none", "--head_hidden_size", "64"]
    with pytest.raises(UsageError, match=f"{flag} needs full-mode training"):
        train_hf.main([*common, "--output_dir", str(tmp_path / "refused")])
    narrower = ["--native_patch_channels", "8", "--native_patch_count", "8"]  # a cheaper patch stream
    if flag != "--native_patches":
        with pytest.raises(UsageError, match="need --native_patches"):
            train_hf.main([*common, *narrower, "--output_dir", str(tmp_path / "refused"), "--train_backbone", "true"])
        narrower = []
    assert train_hf.main([*common, *narrower, "--output_dir", str(out), "--train_backbone", "true",
                          "--cache_views", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["native_fringes"] and json.loads((out / "preprocessor_config.json").read_text())[
        "native_fringes"] == config["native_fringes"]
    again = [str(out) if a == str(converted["ca"]) else a for a in common]  # the trained model, head-only
    del again[again.index(flag) : again.index(flag) + 2]  # no flag: the model's config asks for native inputs
    with pytest.raises(UsageError, match="reads native-resolution inputs: it needs full-mode training"):
        train_hf.main([*again, "--output_dir", str(tmp_path / "head-only")])
    model = CityClassifierForImageClassification.from_pretrained(out)
    # a stream 8 channels wide: 8 x 8 features; the size features: 2
    native = 13 + (64 if flag == "--native_patches" else 2 if flag == "--native_size" else 0)
    assert config["native_fringes"]["size"] is (flag == "--native_size")
    assert model.head.up[0].weight[:, -native:].abs().sum(0).gt(0).all()  # trained away from the zero start
    assert torch.isfinite(model.head.up[0].weight).all()
    if flag == "--native_patches":
        processor = json.loads((out / "preprocessor_config.json").read_text())
        assert config["native_patches"] == processor["native_patches"] == {"count": 8, "size": 32, "channels": 8}
        fine_tune = [str(out) if a == str(converted["ca"]) else a for a in common] + ["--train_backbone", "true"]
        with pytest.raises(UsageError, match="already has a patch stream .* cannot change it"):  # never ignored
            train_hf.main([*fine_tune, "--native_patch_channels", "4", "--output_dir", str(tmp_path / "refused")])
        with pytest.raises(UsageError, match="count must be a positive integer"):
            train_hf.main([*common, "--native_patch_count", "0", "--output_dir", str(tmp_path / "refused"),
                           "--train_backbone", "true"])


@pytest.mark.parametrize("size", [(320, 256), (97, 61), (1200, 900)])
def test_the_fast_passes_equal_their_plain_statements(size):
    """The measurement's whole-picture passes are written for speed (integer edge sums in uint8 and
    uint16, blocks ranked in one sort, the border columns zeroed where they are): each equals a plain
    statement of what it computes, written here with floats and loops."""
    fast = native_module()
    block_edges, block_gradients, pick_blocks = fast.block_edges, fast.block_gradients, fast.pick_blocks

    rng = np.random.default_rng(size[0])
    pixels = np.asarray(illustration(size[0], *size))
    pixels = pixels.copy()
    pixels[:8, :8] = rng.integers(0, 256, (8, 8, 3))  # a noisy corner: the largest differences, 255
    pixels[0, 0], pixels[0, 2], pixels[2, 0] = (0, 0, 0), (255, 255, 255), (255, 255, 255)
    b = 16
    rows, cols = pixels.shape[0] // b, pixels.shape[1] // b
    region = pixels[: rows * b, : cols * b]
    green = region[..., 1].astype(float) / 255
    across, down = np.zeros_like(green), np.zeros_like(green)
    across[:, 1:-1] = np.abs(green[:, 2:] - green[:, :-2])
    down[1:-1, :] = np.abs(green[2:, :] - green[:-2, :])
    plain = (across + down).reshape(rows, b, cols, b).mean((1, 3))
    edges = block_edges(region[..., 1], rows, cols, b)
    np.testing.assert_allclose(edges, plain, rtol=1e-12, atol=1e-15)

    grid, per_cell, min_edge = 3, 2, 0.01
    expected = []
    for r in range(min(grid, rows)):  # cell by cell, strongest first, ties in row-major order
        for c in range(min(grid, cols)):
            members = [(rr, cc) for rr in range(rows) for cc in range(cols)
                       if rr * min(grid, rows) // rows == r and cc * min(grid, cols) // cols == c]
            ranked = sorted(members, key=lambda key: -edges[key])[:per_cell]
            expected += [key for key in ranked if edges[key] > min_edge]
    picked_rows, picked_cols = pick_blocks(edges, grid, per_cell, min_edge)
    assert list(zip(picked_rows.tolist(), picked_cols.tolist())) == expected
    tied = np.ones((4, 4))  # all equal: row-major order within each cell
    assert list(zip(*(a.tolist() for a in pick_blocks(tied, 2, 4, 0.5)))) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
        (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]

    every_row, every_col = np.divmod(np.arange(rows * cols), cols)  # every block, the border ones included
    gradients = block_gradients(region, every_row, every_col, b)
    colour = region.astype(np.float32) * np.float32(1 / 255)
    across = np.zeros_like(colour)
    down = np.zeros_like(colour)
    across[:, 1:-1] = np.abs(colour[:, 2:] - colour[:, :-2])
    down[1:-1, :] = np.abs(colour[2:, :] - colour[:-2, :])
    whole = (across + down).transpose(2, 0, 1)
    for i, (r, c) in enumerate(zip(every_row, every_col)):
        np.testing.assert_array_equal(gradients[i], whole[:, r * b : (r + 1) * b, c * b : (c + 1) * b])


def test_the_spectral_passes_equal_numpys_fft_and_the_plain_sum():
    """The blocks' transforms and correlations are matrix products laid out for speed (real parts and
    imaginary parts side by side, each block's move folded into its matrices): the spectra equal
    numpy's rfft2, the correlation at whole shifts numpy's inverse transform, and at moved,
    fractional shifts the interpolating sum written out term by term."""
    native = native_module()
    rng = np.random.default_rng(5)
    b, k = 16, 4
    blocks = rng.standard_normal((k, 3, b, b))
    spectra = native.block_spectra(blocks)
    np.testing.assert_allclose(spectra, np.fft.rfft2(blocks), rtol=0, atol=1e-12)
    cross = spectra[:, 0] * np.conj(spectra[:, 1])

    whole = tuple(float(d) for d in range(-3, 4))
    circular = np.fft.irfft2(cross, s=(b, b))  # c[d] at d mod b
    index = np.arange(-3, 4) % b
    np.testing.assert_allclose(native.correlation_at(cross, b, None, whole), circular[:, index[:, None], index],
                               rtol=0, atol=1e-12)

    centre = rng.uniform(-2, 2, (k, 2))
    offsets = (-0.25, 0.0, 0.3)
    got = native.correlation_at(cross, b, native.centre_phases(b, centre), offsets)
    freq_y, freq_x = np.fft.fftfreq(b), np.fft.rfftfreq(b)
    weight = np.where((freq_x == 0) | (freq_x == 0.5), 1.0, 2.0)  # a half spectrum's bins stand for two
    for i in range(k):
        for a, dy in enumerate(offsets):
            for c, dx in enumerate(offsets):
                y, x = centre[i, 0] + dy, centre[i, 1] + dx
                total = sum(weight[kx] * cross[i, ky, kx] * np.exp(2j * np.pi * (freq_y[ky] * y + freq_x[kx] * x))
                            for ky in range(b) for kx in range(len(freq_x)))
                assert abs(got[i, a, c] - total.real / b**2) < 1e-10


def test_the_measurement_runs_numpys_blas_on_one_thread(monkeypatch):
    """In one process beside a model (the pipeline), numpy's BLAS threads only spin on the measurement's
    small products and take the cores from torch's: the measurement runs them on one thread, whatever
    numpy is set to, and leaves numpy's setting as it was."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    native = native_module()
    seen = []
    measured = native.block_offsets

    def watched(*args, **kwargs):
        seen.append({info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"})
        return measured(*args, **kwargs)

    monkeypatch.setattr(native, "block_offsets", watched)
    picture = illustration(50, 320, 256)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if not any(info["user_api"] == "blas" for info in threadpoolctl.threadpool_info()):
            pytest.skip("no BLAS that threadpoolctl can see")
        native.measure_native(picture, None, True)
        native.measure_fringes(picture)
        after = {info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"}
    assert seen == [{1}, {1}]
    assert after == {2}  # numpy's own setting back after each measurement


def test_wide_blocks_sum_their_rows_without_overflow_and_no_threadpoolctl_still_measures(monkeypatch):
    """Both sides of the measurement's two branches: blocks wider than 128 px (a block's rows no longer
    fit uint16: summed in uint32) against a plain float statement, and a Python without threadpoolctl,
    where the measurement runs with numpy's BLAS as it is and gives the same numbers."""
    native = native_module()
    b = 160
    y, x = np.mgrid[: 2 * b, : 2 * b]
    green = (255 * ((x // 2 + y // 2) % 2)).astype(np.uint8)  # 2 px squares: every inner pixel adds 510
    plain = green.astype(float) / 255
    across, down = np.zeros_like(plain), np.zeros_like(plain)
    across[:, 1:-1] = np.abs(plain[:, 2:] - plain[:, :-2])
    down[1:-1, :] = np.abs(plain[2:, :] - plain[:-2, :])
    expected = (across + down).reshape(2, b, 2, b).mean((1, 3))
    np.testing.assert_allclose(native.block_edges(green, 2, 2, b), expected, rtol=1e-12)

    picture = illustration(51, 320, 256)
    with_limit = native.measure_native(picture, None, True)
    monkeypatch.setattr(native, "ThreadpoolController", None)
    native.blas_controller.cache_clear()
    try:
        without = native.measure_native(picture, None, True)
        assert native.blas_controller() is None
    finally:
        native.blas_controller.cache_clear()
    np.testing.assert_array_equal(with_limit[0], without[0])
    np.testing.assert_array_equal(with_limit[1], without[1])


def test_cached_training_views_are_keyed_by_the_measurements_code(monkeypatch, tmp_path):
    """train_hf's cached views carry each picture's native measurements; datasets' own cache key hashes
    the mapped function but not the measurement it calls, so a changed native_fringes.py was served
    the old numbers. The key now holds the processor's and the measurement's source: the same inputs
    give the same key (and the cache is reused), a changed measurement (or processor setting, or
    seed) another, and the cache then holds the new code's numbers."""
    import functools
    import inspect
    import sys
    from types import SimpleNamespace

    import datasets

    from citytools.remote import CityClassifierImageProcessor
    from citytools.training_data import cache_random_views, views_cache_fingerprint

    native = native_module()
    processor = CityClassifierImageProcessor(native_fringes=True)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [illustration(70, 200, 150)], "label": [0]},
                               features=features).save_to_disk(tmp_path / "ds")
    ds = datasets.load_from_disk(tmp_path / "ds")  # on disk: datasets caches what is mapped from it
    key = views_cache_fingerprint(ds, processor, 1, 0)
    assert key == views_cache_fingerprint(ds, processor, 1, 0)
    assert key != views_cache_fingerprint(ds, processor, 1, 1)
    assert key != views_cache_fingerprint(ds, processor.with_options(native_fringes={"block": 48}), 1, 0)

    args = SimpleNamespace(cache_views=1)
    first = cache_random_views(ds, processor, args, 0)
    assert first._fingerprint == key
    processing = sys.modules[type(processor).__module__]
    real = processing.measure_native

    @functools.wraps(real)  # keeps __module__: the key finds the measurement's module through it
    def measure_more(*args):
        values, patches = real(*args)
        return values + 1, patches

    monkeypatch.setattr(processing, "measure_native", measure_more)
    cached = cache_random_views(ds, processor, args, 0)  # the code's text unchanged: the cache is reused
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: source(obj) + ("\n# changed" if obj is native else ""))
    assert views_cache_fingerprint(ds, processor, 1, 0) != key
    measured = cache_random_views(ds, processor, args, 0)
    old, reused, new = (np.frombuffer(d[0]["fringe_values"], dtype=np.float32) for d in (first, cached, measured))
    np.testing.assert_array_equal(reused, old)
    np.testing.assert_allclose(new, old + 1)


def test_a_plateau_gives_no_shift_along_the_edges_whatever_the_rounding(monkeypatch):
    """Where the correlation is flat (edges that all run one way), the peak is the one nearest no shift,
    not whichever value rounding raised: the products perturbed by a few units in the last place (what
    another CPU's BLAS kernels do) give the same offsets, block for block, on stripes and on an
    illustration; along the stripes no offset beyond the coarse search's step, across them the shift
    is recovered."""
    native = native_module()
    spec = native.native_fringe_spec(True)
    exact = native.product

    def offsets(picture):
        pixels, _ = native.work_image(picture, spec["work_side"])
        red, blue, *_ = native.block_offsets(pixels, spec)
        return red, blue

    for picture in (moved(stripes(0), red=(0, 1), blue=(0, -1)), moved(illustration(3, 640, 480), red=(1.5, 0))):
        red, blue = offsets(picture)
        assert len(red) >= 20
        for seed in range(3):
            rng = np.random.default_rng(seed)

            def rounded_otherwise(a, b, rng=rng):
                product = exact(a, b)
                return product * (1 + 4e-16 * rng.standard_normal(product.shape))

            monkeypatch.setattr(native, "product", rounded_otherwise)
            again_red, again_blue = offsets(picture)
            np.testing.assert_array_equal(again_red, red)
            np.testing.assert_array_equal(again_blue, blue)
        monkeypatch.setattr(native, "product", exact)
    red, blue = offsets(moved(stripes(0), red=(0, 1), blue=(0, -1)))
    # (dy, dx): along the stripes, no shift beyond the coarse search's step (the interpolation's
    # Nyquist term tilts the plateau by about 1e-5 off whole-pixel rows, which the data then decides)
    assert np.abs(red[:, 1]).max() <= 0.25 and np.abs(blue[:, 1]).max() <= 0.25
    assert abs(np.median(red[:, 0]) - 1) <= 0.2 and abs(np.median(blue[:, 0]) + 1) <= 0.2


def test_nearest_peak_takes_the_largest_and_breaks_ties_towards_the_centre():
    native = native_module()
    offsets = (-1.0, 0.0, 1.0)
    values = np.array([
        [[0, 0, 0], [0, 0, 0], [0, 0, 5]],  # one peak, off centre
        [[5, 0, 5], [0, 0, 0], [5, 0, 5]],  # four corners tied: the first
        [[1, 2, 1], [2, 2, 2], [1, 2, 1]],  # a plateau through the centre: the centre
        [[0, 1, 0], [1 + 1e-13, 0, 1], [0, 1, 0]],  # within the tolerance: nearest, then first
        [[0, 1, 0], [1 + 1e-6, 0, 1], [0, 1, 0]],  # beyond it: the data decides
        [[-3, -2, -3], [-2, -1, -2], [-3, -2, -3]],  # negative values
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],  # flat: the centre
    ], dtype=np.float64)
    assert native.nearest_peak(values, offsets).tolist() == [8, 0, 4, 1, 3, 4, 4]


def test_the_measurement_is_the_same_with_another_cpus_blas_kernels(tmp_path):
    """OpenBLAS picks its kernels by CPU (an AVX2 EPYC, an AVX-512 Xeon): each sums a product in its own
    order. The same pictures are measured in fresh processes with OpenBLAS forced to two kernels that
    every CPU this project runs on has (SSE-only Nehalem, AVX2 Haswell) and, where the CPU has AVX-512,
    the SkylakeX one: the features are bit for bit the same."""
    import json
    import subprocess
    import sys

    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    if not blas or blas[0]["internal_api"] != "openblas":
        pytest.skip("numpy's BLAS is not OpenBLAS: its kernels cannot be forced here")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kernels = ["Nehalem"] + (["Haswell"] if " avx2" in flags and " fma" in flags else []) + (
        ["SkylakeX"] if " avx512f" in flags and " avx512bw" in flags else [])
    if len(kernels) < 2:
        pytest.skip("this CPU runs only one of the kernels compared")
    pictures = [moved(stripes(1), red=(0, 1)), moved(stripes(2).rotate(90, expand=True), blue=(2, 0)),
                moved(illustration(4, 480, 360), red=(1, 0.5), blue=(-1, 0))]
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"{i}.png")
    probe = ("import json, sys, threadpoolctl\n"
             "from PIL import Image\n"
             "from citytools.remote import measure_fringes\n"
             f"files = [{', '.join(repr(str(tmp_path / f'{i}.png')) for i in range(len(pictures)))}]\n"
             "kernel = [i['architecture'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'][0]\n"
             "print(json.dumps([kernel, [measure_fringes(Image.open(f)).tolist() for f in files]]))\n")
    seen = {}
    for kernel in kernels:
        env = {**__import__("os").environ, "OPENBLAS_CORETYPE": kernel}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parent.parent, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        used, values = json.loads(done.stdout.strip().splitlines()[-1])
        assert used.lower() == kernel.lower(), (kernel, used)  # the kernel was forced
        seen[kernel] = values
    for kernel in kernels[1:]:
        assert seen[kernel] == seen[kernels[0]], kernel


def test_native_dropout_zeroes_whole_pictures_native_inputs_in_training_only(converted, tmp_path):
    """config.native_dropout: in training, about that share of pictures reach the head with their
    native inputs (measurements and patch features) all zero, the others with them untouched (not
    rescaled); in evaluation none. Bad values are refused."""
    import torch

    from citytools.remote import NATIVE_FRINGE_FEATURES, CityClassifierConfig

    model, _ = tiny_native_model(tmp_path, converted)
    model.add_native_fringes()
    model.config.native_dropout = 0.3
    count = len(NATIVE_FRINGE_FEATURES)
    embeds = torch.randn(2000, 1, model.config.vision_config.projection_dim)
    values = torch.rand(2000, count) * 3 + 0.1  # every measurement above zero
    expected = values.log1p()
    torch.manual_seed(0)
    model.train()
    native = model._head_input(embeds, values)[:, 0, -count:]
    dropped = (native == 0).all(1)
    assert ((native == expected).all(1) | dropped).all()  # whole pictures, the rest unscaled
    assert 0.26 < dropped.float().mean().item() < 0.34
    model.eval()
    assert torch.equal(model._head_input(embeds, values)[:, 0, -count:], expected)
    for bad in (1.0, -0.1, "0.3"):
        with pytest.raises(ValueError, match="native_dropout"):
            CityClassifierConfig(native_dropout=bad)
