"""Issue #14: fringe measurements in the model, grid tiling at native resolution, real pictures in the
generator (split by source), and the benchmark's per-family breakdowns."""

import json

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image


def fringed(pixels, red, blue):
    """(H, W, 3) uint8 with the red channel moved `red` px right and the blue one `blue` px right
    (integer shifts, edges repeated): a fringe of |red - blue| px, stated without the model's code."""
    out = pixels.copy()
    for channel, shift in ((0, red), (2, blue)):
        if shift:
            moved = np.roll(pixels[..., channel], shift, axis=1)
            moved[:, :shift] = pixels[:, :1, channel] if shift > 0 else moved[:, :shift]
            out[..., channel] = moved
    return out


def textured(size=336, seed=0):
    """Blocky random shapes: edges everywhere, of every colour."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 12, size // 12, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.NEAREST))


def normalised(pixels):
    from remote_code import CityClassifierImageProcessor

    processor = CityClassifierImageProcessor()
    return torch.from_numpy(processor.normalize_pixels(pixels))[None]


def fringe_module(**spec):
    from remote_code import CityClassifierConfig, CityClassifierFringe

    return CityClassifierFringe(CityClassifierConfig.fringe_spec(spec or True))


def features_of(pixels):
    from remote_code import FRINGE_FEATURES

    return dict(zip(FRINGE_FEATURES, fringe_module()(normalised(pixels))[0].tolist()))


@pytest.mark.parametrize("red, blue", [(2, -2), (1, -1), (3, 0), (0, -2)])
def test_fringe_features_measure_the_red_and_blue_shift_against_green(red, blue):
    image = textured()
    clean, shifted = features_of(image), features_of(fringed(image, red, blue))
    assert clean["fringe_coherent"] < 0.3 and clean["fringe_mean"] < 0.5
    assert shifted["fringe_coherent"] == pytest.approx(abs(red - blue), abs=0.35)
    assert shifted["red_shift"] == pytest.approx(abs(red), abs=0.35)
    assert shifted["blue_shift"] == pytest.approx(abs(blue), abs=0.35)
    assert shifted["red_gain"] > clean["red_gain"] or red == 0
    assert shifted["edge_blocks"] == pytest.approx(1.0)


def test_fringe_features_are_zero_on_a_flat_view_and_batch_independent():
    flat = np.full((336, 336, 3), 128, np.uint8)
    batch = torch.cat([normalised(flat), normalised(fringed(textured(seed=1), 2, -2)), normalised(textured(seed=2))])
    features = fringe_module()(batch)
    assert torch.equal(features[0], torch.zeros_like(features[0]))
    one_by_one = torch.cat([fringe_module()(view[None]) for view in batch])
    torch.testing.assert_close(features, one_by_one, rtol=1e-5, atol=1e-5)
    assert fringe_module()(batch.to(torch.bfloat16)).dtype == torch.float32


def test_fringe_features_on_views_smaller_than_a_block():
    features = fringe_module()(torch.randn(3, 3, 30, 30))
    assert features.shape == (3, 8) and torch.isfinite(features).all()


def test_fringe_config_is_validated_and_stored():
    from remote_code import CityClassifierConfig

    assert CityClassifierConfig().fringe_features is None
    assert CityClassifierConfig(fringe_features=True).fringe_features == {
        "block": 48, "max_shift": 3, "min_edge": 0.02, "blocks": 12}
    assert CityClassifierConfig(fringe_features={"block": 32}).fringe_features["block"] == 32
    for bad in ({"block": 6}, {"max_shift": 0}, {"size": 3}, {"blocks": 0}, "yes"):
        with pytest.raises(ValueError, match="fringe_features"):
            CityClassifierConfig(fringe_features=bad)


def test_fringe_model_feeds_the_head_and_add_fringe_features_keeps_the_scores(converted, tmp_path):
    from remote_code import FRINGE_FEATURES, CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"])
    inputs = processor([make_image(150, 130, seed=3), make_image(40, 50, seed=4)], return_tensors="pt")
    before = model(**inputs).scores
    projection = model.config.vision_config.projection_dim
    model.add_fringe_features()
    assert model.head.up[0].in_features == projection + len(FRINGE_FEATURES)
    torch.testing.assert_close(model(**inputs).scores, before, rtol=0, atol=0)  # zero weights: same scores
    embeds = model.get_image_features(inputs["pixel_values"][0])
    assert embeds.shape == (5, projection + len(FRINGE_FEATURES))
    torch.testing.assert_close(embeds[:, projection:], model.fringe(inputs["pixel_values"][0]))
    with torch.no_grad():
        model.head.up[0].weight[:, projection:] = 1.0  # now the measurements must move the scores
    moved = model(**inputs).scores
    assert not torch.allclose(moved, before)
    model.save_pretrained(tmp_path / "fringe")
    saved = json.loads((tmp_path / "fringe" / "config.json").read_text())
    assert saved["fringe_features"]["max_shift"] == 3
    again = CityClassifierForImageClassification.from_pretrained(tmp_path / "fringe").eval()
    torch.testing.assert_close(again(**inputs).scores, moved)


def test_a_fringe_model_does_not_share_embeddings_with_the_same_backbone_without_them(converted, tmp_path):
    from remote_code import CityClassifierForImageClassification
    from scoring import Scorer

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"])
    model.add_fringe_features()
    model.save_pretrained(tmp_path / "fringe")
    (tmp_path / "fringe" / "preprocessor_config.json").write_text(
        (converted["ca"] / "preprocessor_config.json").read_text())
    scorer = Scorer([str(converted["ca"]), str(tmp_path / "fringe")], device="cpu", dtype="float32")
    assert len(scorer.groups) == 2


# ------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("size", [(673, 673), (1344, 700), (2000, 1500), (4000, 3000), (9000, 700), (20000, 700)])
def test_grid_layout_covers_every_pixel_with_full_tiles(size):
    from remote_code import grid_layout

    tile, max_tiles = 672, 48
    (width, height), boxes = grid_layout(*size, tile, max_tiles)
    assert len(boxes) <= max_tiles
    covered = np.zeros((height, width), bool)
    for left, top, right, bottom in boxes:
        assert (right - left, bottom - top) == (tile, tile)
        assert 0 <= left and 0 <= top and right <= width and bottom <= height
        covered[top:bottom, left:right] = True
    assert covered.all()
    fits = np.ceil(size[0] / tile) * np.ceil(size[1] / tile) <= max_tiles
    assert ((width, height) == size) == fits  # native resolution whenever the tiles fit


def test_grid_views_are_native_crops_and_small_images_match_the_original():
    from remote_code import CityClassifierImageProcessor

    processor = CityClassifierImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    grid = processor.with_options(tiling_mode="grid")
    small = make_image(50, 60, seed=1)
    np.testing.assert_array_equal(grid(small)["pixel_values"], processor(small)["pixel_values"])
    big = make_image(200, 130, seed=2)  # 4 x 3 tiles of 60 px at native resolution
    views = grid.views(big)
    assert len(views) == 12
    pixels = np.asarray(big)
    xs, ys = [0, 47, 93, 140], [0, 35, 70]  # evenly spread from edge to edge, written out by hand
    for view, (y, x) in zip(views, [(y, x) for y in ys for x in xs]):
        np.testing.assert_array_equal(np.asarray(view), pixels[y : y + 60, x : x + 60])
    out = grid([big, small], return_tensors="np")
    assert out["pixel_values"].shape == (2, 12, 3, 30, 30)
    assert out["tile_mask"].sum(1).tolist() == [12, 1]
    expected = processor.clip_preprocess(Image.fromarray(pixels[35:95, 47:107]))
    np.testing.assert_array_equal(out["pixel_values"][0, 5], expected)


def test_grid_tiling_is_refused_for_device_crops_and_checked():
    from remote_code import CityClassifierImageProcessor

    with pytest.raises(ValueError, match="tiling_mode"):
        CityClassifierImageProcessor(tiling_mode="nine")
    assert not CityClassifierImageProcessor(tiling_mode="grid").device_views_supported()


def test_classify_grid_tiling_end_to_end_and_resume_refuses_another_mode(converted, tmp_path):
    import classify

    folder = tmp_path / "images"
    folder.mkdir()
    make_image(300, 200, seed=5).save(folder / "big.png")
    make_image(40, 40, seed=6).save(folder / "small.png")
    out = tmp_path / "scores.jsonl"
    common = [str(folder), "--model", str(converted["ca"]), "--out", str(out), "--device", "cpu", "--dtype", "float32"]
    assert classify.main([*common, "--tiling-mode", "grid", "--workers", "0"]) == 0
    rows = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"big.png", "small.png"} and all(row["error"] is None for row in rows.values())

    from remote_code import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"]).with_options(tiling_mode="grid")
    with torch.no_grad():
        expected = model(**processor(Image.open(folder / "big.png"), return_tensors="pt")).scores[0]
    key = [k for k in rows["big.png"] if k.endswith(":Chromatic Aberration")][0]
    assert rows["big.png"][key] == pytest.approx(float(expected[1]), abs=1e-5)
    from toolkit import UsageError

    with pytest.raises(UsageError, match="another setup"):  # another tiling mode: not mixed into one output
        classify.main([*common, "--workers", "0"])


# -------------------------------------------------------------------------------------- generator


def test_pictures_are_split_by_group_per_family_for_good():
    import make_synthetic_data as m

    pictures = [(f"/p/{family}/{g}/{i}.png", family, f"/p/{family}/{g}")
                for family in ("photo", "pixel art") for g in range(30) for i in range(3)]
    splits = m.split_pictures(pictures)
    assert splits == m.split_pictures(list(reversed(pictures)))  # fixed: order does not matter
    groups = {split: {path.rsplit("/", 1)[0] for family in by.values() for path, _ in family}
              for split, by in splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    for family in ("photo", "pixel art"):
        assert len(splits["test"][family]) == 6 * 3 and len(splits["validation"][family]) == 3 * 3


def test_wallpaper_resolutions_share_a_group_and_rules_pick_families():
    import re

    import make_synthetic_data as m

    a = "/usr/share/wallpapers/Path/contents/images/1920x1080.jpg"
    b = "/usr/share/wallpapers/Path/contents/images/5120x2880.jpg"
    assert m.picture_group(a) == m.picture_group(b) != m.picture_group(a.replace("Path", "Kite"))

    def family(package, path):
        return next((f for p, pattern, f in m.DEBIAN_RULES if p == package and re.search(pattern, path)), None)

    assert family("plasma-workspace-wallpapers", a) == "photo"
    assert family("plasma-workspace-wallpapers", a.replace("Path", "Cascade")) == "3D render"
    assert family("naev-data", "/usr/share/games/naev/dat/gfx/portraits/neutral/a.png") == "painted"
    assert family("hedgewars-data", "/usr/share/games/hedgewars/Data/Graphics/Hats/x.png") is None  # sprites: out
    assert {f for _, _, f in m.DEBIAN_RULES} <= set(m.FAMILIES)


def test_transparent_pictures_are_composited_before_the_effect(tmp_path):
    import make_synthetic_data as m

    rgba = np.zeros((200, 160, 4), np.uint8)
    rgba[40:160, 30:130] = (250, 20, 20, 255)  # an opaque red square on a transparent field
    path = tmp_path / "stamp.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert m.usable_picture(path)
    image, strength, source = m.make_example(12, "shift", [], picture=path, backgrounds=())
    assert image.mode == "RGB" and strength > 0 and source == str(path)
    corner = np.asarray(image)[:5, :5].reshape(-1, 3)
    assert not (corner == 0).all()  # the transparent field became a background, not black
    Image.fromarray(rgba[:100, :100], "RGBA").save(tmp_path / "tiny.png")
    assert not m.usable_picture(tmp_path / "tiny.png")  # icons are left out


# -------------------------------------------------------------------------------------- benchmark


def test_benchmark_derives_size_and_clean_family_columns():
    import benchmark

    rows = [benchmark.derive_columns({"width": "2560", "height": "1600", "effect": "clean", "family": "photo",
                                      "strength": "0.0"}),
            benchmark.derive_columns({"width": "300", "height": "200", "effect": "shift", "family": "photo",
                                      "strength": "2.0"}),
            benchmark.derive_columns({"label": 0}),
            benchmark.derive_columns({"width": "4000", "height": "3000", "effect": "shift", "strength": "1.5"})]
    assert rows[0]["megapixels"] == "4 MP and more" and rows[0]["clean family"] == "photo"
    assert "strength, 4 MP and more" not in rows[0]
    assert rows[1]["megapixels"] == "under 1 MP" and "clean family" not in rows[1]
    assert "strength, 4 MP and more" not in rows[1]
    assert "megapixels" not in rows[2]
    assert rows[3]["strength, 4 MP and more"] == "1.5" and rows[3]["megapixels"] == "4 MP and more"


def test_benchmark_grid_pass_and_per_family_tables(converted, tmp_path):
    import benchmark
    import make_synthetic_data as m

    data = tmp_path / "data" / "test"
    rng = np.random.default_rng(0)
    rows = ["file_name,effect,strength,family,width,height"]
    for i in range(8):
        image = make_image(130 + 10 * i, 125, seed=i)
        effect, strength = ("shift", 3.0) if i % 2 else ("clean", 0.0)
        if effect == "shift":
            image = m.channel_shift(image, rng, strength)
        folder = f"{i % 2}_{effect}"
        (data / folder).mkdir(parents=True, exist_ok=True)
        image.save(data / folder / f"{i}.png")
        rows.append(f"{folder}/{i}.png,{effect},{strength},{'photo' if i < 4 else 'pixel art'},{image.width},125")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "report"
    assert benchmark.main(["--model", str(converted["ca"]), "--dataset", str(tmp_path / "data"), "--split", "test",
                           "--out", str(out), "--workers", "0", "--passes", "tiling,grid", "--no-baseline"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ca tiling-mean", "ca grid-mean", "ca grid-max"} <= set(metrics["models"])
    assert "ca no-tiling" not in metrics["models"]
    assert metrics["models"]["ca grid-mean"]["headline"] and metrics["models"]["ca tiling-mean"]["headline"]
    assert not metrics["models"]["ca grid-max"]["headline"]
    by_family = metrics["models"]["ca grid-mean"]["by"]["family"]
    assert by_family["photo"]["n"] == 4 and "roc_auc" in by_family["photo"]
    report = (out / "report.md").read_text()
    assert "## ROC AUC by family" in report and "## By clean family" in report
    assert "| photo | 4 | 2 |" in report
