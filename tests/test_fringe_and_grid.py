"""Issue #14's model code: the fringe measurements (`CityClassifierFringe`, `fringe_features`) and
grid tiling in the processor. Runs on the oldest supported transformers too (`make test-compat`)."""

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
    from citytools.remote import CityClassifierImageProcessor

    processor = CityClassifierImageProcessor()
    return torch.from_numpy(processor.normalize_pixels(pixels))[None]


def fringe_module(**spec):
    from citytools.remote import CityClassifierConfig, CityClassifierFringe

    return CityClassifierFringe(CityClassifierConfig.fringe_spec(spec or True))


def features_of(pixels):
    from citytools.remote import FRINGE_FEATURES

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
    from citytools.remote import CityClassifierConfig

    assert CityClassifierConfig().fringe_features is None
    assert CityClassifierConfig(fringe_features=True).fringe_features == {
        "block": 48, "max_shift": 3, "min_edge": 0.02, "blocks": 12}
    assert CityClassifierConfig(fringe_features={"block": 32}).fringe_features["block"] == 32
    for bad in ({"block": 6}, {"max_shift": 0}, {"size": 3}, {"blocks": 0}, "yes"):
        with pytest.raises(ValueError, match="fringe_features"):
            CityClassifierConfig(fringe_features=bad)


def test_fringe_model_feeds_the_head_and_add_fringe_features_keeps_the_scores(converted, tmp_path):
    from citytools.remote import FRINGE_FEATURES, CityClassifierForImageClassification, CityClassifierImageProcessor

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


# ------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("size", [(673, 673), (1344, 700), (2000, 1500), (4000, 3000), (9000, 700), (20000, 700)])
def test_grid_layout_covers_every_pixel_with_full_tiles(size):
    from citytools.tiling import grid_layout

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
    from citytools.remote import CityClassifierImageProcessor

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
    from citytools.pil_resize import device_views_supported
    from citytools.remote import CityClassifierImageProcessor

    with pytest.raises(ValueError, match="tiling_mode"):
        CityClassifierImageProcessor(tiling_mode="nine")
    assert not device_views_supported(CityClassifierImageProcessor(tiling_mode="grid"))
