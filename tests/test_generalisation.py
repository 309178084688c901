"""Issue #14's tools: scoring and classify.py with fringe models and grid tiling, real pictures in
the generator (split by source), and the benchmark's per-family breakdowns and passes."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from conftest import make_image, write_benchmark_split
from PIL import Image


def test_a_fringe_model_does_not_share_embeddings_with_the_same_backbone_without_them(converted, tmp_path):
    from citytools.remote import CityClassifierForImageClassification
    from citytools.scorer import Scorer

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"])
    model.add_fringe_features()
    model.save_pretrained(tmp_path / "fringe")
    (tmp_path / "fringe" / "preprocessor_config.json").write_text(
        (converted["ca"] / "preprocessor_config.json").read_text())
    scorer = Scorer([str(converted["ca"]), str(tmp_path / "fringe")], device="cpu", dtype="float32")
    assert len(scorer.groups) == 2


def test_classify_grid_tiling_end_to_end_and_resume_refuses_another_mode(converted, tmp_path):
    from citytools.cli import classify

    folder = tmp_path / "images"
    folder.mkdir()
    make_image(300, 200, seed=5).save(folder / "big.png")
    make_image(40, 40, seed=6).save(folder / "small.png")
    out = tmp_path / "scores.jsonl"
    common = [str(folder), "--model", str(converted["ca"]), "--out", str(out), "--device", "cpu", "--dtype", "float32"]
    assert classify.main([*common, "--tiling-mode", "grid", "--workers", "0"]) == 0
    rows = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"big.png", "small.png"} and all(row["error"] is None for row in rows.values())

    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"]).with_options(tiling_mode="grid")
    with torch.no_grad():
        expected = model(**processor(Image.open(folder / "big.png"), return_tensors="pt")).scores[0]
    key = [k for k in rows["big.png"] if k.endswith(":Chromatic Aberration")][0]
    assert rows["big.png"][key] == pytest.approx(float(expected[1]), abs=1e-5)
    from citytools.toolkit import UsageError

    with pytest.raises(UsageError, match="another setup"):  # another tiling mode: not mixed into one output
        classify.main([*common, "--workers", "0"])


# -------------------------------------------------------------------------------------- generator


def test_pictures_are_split_by_group_per_family_for_good():
    from citytools.cli import make_synthetic_data as m

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

    from citytools import pictures

    a = "/usr/share/wallpapers/Path/contents/images/1920x1080.jpg"
    b = "/usr/share/wallpapers/Path/contents/images/5120x2880.jpg"
    assert pictures.picture_group(a) == pictures.picture_group(b) != pictures.picture_group(a.replace("Path", "Kite"))

    def family(package, path):
        return next((f for p, pattern, f in pictures.DEBIAN_RULES if p == package and re.search(pattern, path)), None)

    assert family("plasma-workspace-wallpapers", a) == "photo"
    assert family("plasma-workspace-wallpapers", a.replace("Path", "Cascade")) == "3D render"
    assert family("naev-data", "/usr/share/games/naev/dat/gfx/portraits/neutral/a.png") == "painted"
    assert family("hedgewars-data", "/usr/share/games/hedgewars/Data/Graphics/Hats/x.png") is None  # sprites: out
    assert {f for _, _, f in pictures.DEBIAN_RULES} <= set(pictures.FAMILIES)


def test_transparent_pictures_are_composited_before_the_effect(tmp_path):
    from citytools import pictures
    from citytools.cli import make_synthetic_data as m

    rgba = np.zeros((200, 160, 4), np.uint8)
    rgba[40:160, 30:130] = (250, 20, 20, 255)  # an opaque red square on a transparent field
    path = tmp_path / "stamp.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert pictures.usable_picture(path)
    image, strength, source = m.make_example(12, "shift", [], picture=path, backgrounds=())
    assert image.mode == "RGB" and strength > 0 and source == str(path)
    corner = np.asarray(image)[:5, :5].reshape(-1, 3)
    assert not (corner == 0).all()  # the transparent field became a background, not black
    Image.fromarray(rgba[:100, :100], "RGBA").save(tmp_path / "tiny.png")
    assert not pictures.usable_picture(tmp_path / "tiny.png")  # icons are left out


def fringe_pixels(image):
    """Pixels where red or blue differ from green by more than the generator's visible level: on a
    grey picture (R = G = B), where a shift put a fringe."""
    a = np.asarray(image, np.int16)
    return int(((np.abs(a[..., 0] - a[..., 1]) > 16) | (np.abs(a[..., 2] - a[..., 1]) > 16)).sum())


def test_a_positive_always_shows_its_fringe(tmp_path):
    from citytools.cli import make_synthetic_data as m

    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (255, 255, 255)).save(blank)
    edges = tmp_path / "edges.png"
    grey = np.full((300, 400), 230, np.uint8)
    grey[::20] = grey[:, ::20] = 20  # a dark grid on light grey: edges everywhere, no colour of its own
    Image.fromarray(grey).convert("RGB").save(edges)
    for seed in range(4):
        kept, _, source = m.make_example(seed, "shift", [], picture=blank, keep_invisible=True)
        assert source == str(blank) and np.ptp(np.asarray(kept)) == 0  # the old way: a blank "positive"
        image, strength, source = m.make_example(seed, "shift", [], picture=blank)
        assert source in ("drawn",) or source.startswith("photo:")  # a stand-in with a fringe to see
        assert strength > 0 and np.ptp(np.asarray(image)) > 0
        # a picture that shows the fringe keeps its first draw, the same as before the check
        image, _, source = m.make_example(seed, "shift", [], picture=edges)
        kept, _, _ = m.make_example(seed, "shift", [], picture=edges, keep_invisible=True)
        assert source == str(edges) and np.array_equal(np.asarray(image), np.asarray(kept))
        assert fringe_pixels(image) >= m.VISIBLE_PIXELS
    # the stand-in's family follows it, not the blank picture's
    options = {"keep_invisible": False, "blurred_negatives": 0.0, "resized": 0.0, "upscaled": 0.0, "delivered": 0.0,
               "jpeg_quality": 70}
    row = m.write_one((3, "shift", tmp_path / "out" / "1_shift" / "0.png", [], blank, "pixel art", (), options))
    assert row[3] == "drawn" and row[5] == "drawn"
    row = m.write_one((3, "clean", tmp_path / "out" / "0_clean" / "1.png", [], blank, "pixel art", (), options))
    assert row[3] == str(blank) and row[5] == "pixel art"  # a blank clean picture is a fine negative


def test_blurred_negatives_and_upscaled_pictures_change_nothing_else(tmp_path):
    from citytools.cli import make_synthetic_data as m

    args = ["--train", "0", "--validation", "0", "--test", "40", "--seed", "5", "--workers", "1", "--no-photos"]
    assert m.main(["--out", str(tmp_path / "plain"), *args]) == 0
    assert m.main(["--out", str(tmp_path / "soft"), *args, "--blurred-negatives", "0.5"]) == 0
    plain = {r["file_name"]: r for r in csv.DictReader(open(tmp_path / "plain" / "test" / "metadata.csv"))}
    soft = {r["file_name"]: r for r in csv.DictReader(open(tmp_path / "soft" / "test" / "metadata.csv"))}
    assert plain.keys() == soft.keys() and "negative_blur" not in next(iter(plain.values()))
    blurred = 0
    for name, row in soft.items():
        a = np.asarray(Image.open(tmp_path / "plain" / "test" / name), np.float64)
        b = np.asarray(Image.open(tmp_path / "soft" / "test" / name), np.float64)
        radius = float(row["negative_blur"])
        if row["label"] == "1" or radius == 0:
            assert radius == 0 and np.array_equal(a, b), name  # positives and the sharp rest: the same bytes
            continue
        blurred += 1
        assert 0.5 <= radius <= 1.5 and a.shape == b.shape
        detail = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
        assert row["effect"] == "sketch" or detail(b) < detail(a), name  # softer than the sharp original
    negatives = sum(r["label"] == "0" for r in soft.values())
    assert 0 < blurred < negatives  # about half of them

    # --upscaled: clean and aberrated pictures alike enlarged 1.25-2.5x, the rest unchanged
    assert m.main(["--out", str(tmp_path / "big"), *args, "--upscaled", "0.5"]) == 0
    big = {r["file_name"]: r for r in csv.DictReader(open(tmp_path / "big" / "test" / "metadata.csv"))}
    enlarged = set()
    for name, row in big.items():
        a, b = Image.open(tmp_path / "plain" / "test" / name), Image.open(tmp_path / "big" / "test" / name)
        factor = float(row["upscaled"])
        if factor == 1.0:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
            continue
        enlarged.add(row["label"])
        assert 1.25 <= factor <= 2.5, name  # the factor is written to 3 decimals: sizes within a pixel
        assert abs(b.width - a.width * factor) <= 1 and abs(b.height - a.height * factor) <= 1, name
        assert (int(row["width"]), int(row["height"])) == b.size
    assert enlarged == {"0", "1"}


def test_line_art_and_outline_negatives_are_drawn_and_opt_in(tmp_path):
    from citytools.cli import make_synthetic_data as m

    args = ["--train", "0", "--validation", "0", "--test", "60", "--seed", "2", "--workers", "1", "--no-photos",
            "--positive-fraction", "0.2"]
    assert m.main(["--out", str(tmp_path / "plain"), *args]) == 0
    assert m.main(["--out", str(tmp_path / "lines"), *args, "--line-art", "--outlined"]) == 0
    plain = list(csv.DictReader(open(tmp_path / "plain" / "test" / "metadata.csv")))
    lines = list(csv.DictReader(open(tmp_path / "lines" / "test" / "metadata.csv")))
    assert not any(r["effect"] in ("lineart", "outlined") for r in plain)
    assert [r["label"] for r in plain] == [r["label"] for r in lines]  # the same plan, some negatives' kinds differ
    for kind in ("lineart", "outlined"):
        drawn = [r for r in lines if r["effect"] == kind]
        assert drawn and all(r["label"] == "0" and r["file_name"].startswith(f"0_{kind}/") for r in drawn)
        for row in drawn:
            image = np.asarray(Image.open(tmp_path / "lines" / "test" / row["file_name"]), np.int16)
            assert np.abs(np.diff(image, axis=1)).max() > 100  # hard, coloured edges
    with pytest.raises(SystemExit):
        m.parse_args(["--out", "x", "--hard-negatives", "lineart,nonsense"])
    assert m.parse_args(["--out", "x", "--hard-negatives", "lineart"]).hard_negatives == ("lineart",)


def test_family_weights_draw_families_as_asked_and_refuse_unknown_ones():
    from citytools.cli import make_synthetic_data as m

    pictures = {family: [(f"/p/{family}/{i}.png", f"/p/{family}") for i in range(5)]
                for family in ("photo", "pixel art", "3D render")}
    planned = [(i, "clean") for i in range(3000)]
    for weights, expected in ((None, {"photo": 1 / 3, "pixel art": 1 / 3, "3D render": 1 / 3}),
                              ({"pixel art": 4}, {"photo": 1 / 6, "pixel art": 4 / 6, "3D render": 1 / 6})):
        chosen = m.pick_pictures(planned, "train", 0, pictures, 1.0, weights)
        families = [family for _, family in chosen]
        for family, share in expected.items():
            assert abs(families.count(family) / len(families) - share) < 0.03, (weights, family)
    assert m.pick_pictures([(0, "lineart")], "train", 0, pictures, 1.0) == [(None, None)]  # drawn only
    assert m.family_weights("pixel art=2, 3D render=1.5") == {"pixel art": 2.0, "3D render": 1.5}
    for bad in ("pixel=2", "sketch=2", "pixel art=0", "pixel art=x", "pixel art=inf", "pixel art=nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            m.family_weights(bad)


def test_pixel_art_is_enlarged_by_whole_factors_before_the_effect(tmp_path):
    from citytools.cli import make_synthetic_data as m

    tile = np.random.default_rng(0).integers(0, 4, (150, 200)) * 80  # 4 flat colours, hard edges
    path = tmp_path / "tiles.png"
    Image.fromarray(np.stack([tile, 255 - tile, tile // 2], -1).astype(np.uint8)).save(path)
    scales = {m.draw_pixel_scale(path, "pixel art", seed, 1.0) for seed in range(40)}
    assert scales == {2, 3, 4}
    assert {m.draw_pixel_scale(path, "photo", seed, 1.0) for seed in range(10)} == {1}  # pixel art only
    assert {m.draw_pixel_scale(path, "pixel art", seed, 0.0) for seed in range(10)} == {1}
    big = tmp_path / "big.png"
    Image.new("RGB", (900, 300)).save(big)
    assert {m.draw_pixel_scale(big, "pixel art", seed, 1.0) for seed in range(20)} == {2}  # at most 2048 px
    for seed in range(6):  # a clean picture: every 3x3 block one colour; an aberrated one keeps its size
        clean, _, _ = m.make_example(seed, "clean", [], picture=path, pixel_scale=3)
        a = np.asarray(clean)
        assert a.shape[0] % 3 == 0 and a.shape[1] % 3 == 0
        assert np.array_equal(a, np.repeat(np.repeat(a[::3, ::3], 3, 0), 3, 1))
        shifted, strength, _ = m.make_example(seed, "shift", [], picture=path, pixel_scale=3)
        assert shifted.size == clean.size and strength > 0
    options = {"keep_invisible": False, "pixel_scaled": 1.0, "blurred_negatives": 0.0, "resized": 0.0,
               "upscaled": 0.0, "delivered": 0.0, "jpeg_quality": 70}
    row = m.write_one((1, "clean", tmp_path / "out" / "0_clean" / "0.png", [], path, "pixel art", (), options))
    assert row[-1] in (2, 3, 4) and row[5] == "pixel art"
    row = m.write_one((1, "clean", tmp_path / "out" / "0_clean" / "1.png", [], None, None, (), options))
    assert row[-1] == 1  # a drawn image is never pixel-scaled


# -------------------------------------------------------------------------------------- benchmark


def test_benchmark_derives_size_and_clean_family_columns():
    from citytools.cli import benchmark

    rows = [benchmark.derive_columns({"width": "2560", "height": "1600", "effect": "clean", "family": "photo",
                                      "strength": "0.0"}),
            benchmark.derive_columns({"width": "300", "height": "200", "effect": "shift", "family": "photo",
                                      "strength": "2.0"}),
            benchmark.derive_columns({"label": 0}),
            benchmark.derive_columns({"width": "4000", "height": "3000", "effect": "shift", "strength": "1.5"})]
    assert rows[0]["megapixels"] == "4 MP and more" and rows[0]["clean family"] == "photo"
    assert "strength, 4 MP and more" not in rows[0]
    assert rows[1]["megapixels"] == "under 1 MP" and "clean family" not in rows[1]
    assert [rows[i]["long side"] for i in (1, 0, 3)] == ["256-511 px", "1024 px and more", "1024 px and more"]
    sizes = (("255", "90"), ("100", "256"), ("1023", "40"), ("512", "9"))
    sides = [benchmark.derive_columns({"width": w, "height": h})["long side"] for w, h in sizes]
    assert sides == ["under 256 px", "256-511 px", "512-1023 px", "512-1023 px"]
    assert "strength, 4 MP and more" not in rows[1]
    assert "megapixels" not in rows[2] and "long side" not in rows[2]
    soft = [benchmark.derive_columns({"effect": "clean", "negative_blur": radius}) for radius in ("0.0", "1.2")]
    assert [r["clean, blurred"] for r in soft] == ["sharp", "blurred"] and "clean, blurred" not in rows[0]
    assert rows[3]["strength, 4 MP and more"] == "1.5" and rows[3]["megapixels"] == "4 MP and more"


def test_report_rows_come_in_a_natural_order():
    from citytools.plots import sort_key

    values = ["webp", "1024 px and more", "2.0", "under 256 px", "512-1023 px", "0.5", "256-511 px", "jpeg 4:2:0"]
    assert sorted(values, key=sort_key) == ["0.5", "2.0", "under 256 px", "256-511 px", "512-1023 px",
                                            "1024 px and more", "jpeg 4:2:0", "webp"]
    assert sorted(["4 MP and more", "under 1 MP", "1-4 MP"], key=sort_key) == ["under 1 MP", "1-4 MP", "4 MP and more"]
    assert sorted(["3D render", "", "under", "clip art"], key=sort_key) == ["", "3D render", "clip art", "under"]


def test_benchmark_grid_pass_and_per_family_tables(converted, tmp_path):
    from citytools.cli import benchmark

    write_benchmark_split(tmp_path / "data" / "test", size=(130, 125),
                          family=lambda i: "photo" if i < 4 else "pixel art")
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
    assert (out / "families.png").is_file()
    assert "## ROC AUC by clean family" not in report  # clean images only: no positives, no ROC AUC
    assert "## By shift strength" in report
    with open(out / "scores.csv", newline="") as f:
        scored = list(csv.DictReader(f))
    assert len(scored) == 8 and {"ca tiling-mean", "ca grid-mean", "family", "label"} <= set(scored[0])
    assert {row["label"] for row in scored} == {"0", "1"}
    assert "| photo | 4 | 2 |" in report


def test_a_recipe_with_packages_missing_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    """Without its Debian packages a --real-pictures recipe makes another dataset: refused in one line
    naming them, made (with a warning) only when asked."""
    from citytools import pictures
    from citytools.cli import make_synthetic_data as m

    listed = {"naev-data": None}  # one package "not installed", the others installed (empty here)
    monkeypatch.setattr(pictures, "package_files", lambda package, install=False: listed.get(package, []))
    out = tmp_path / "data"
    assert m.main(["--out", str(out), "--train", "2", "--validation", "0", "--test", "0", "--real-pictures", "0.5",
                   "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "naev-data" in err and "--allow-missing-packages" in err
    assert not out.exists()  # nothing written
    with pytest.raises(pictures.MissingPackages):
        pictures.real_pictures(allow_missing=False)
    found = pictures.real_pictures(allow_missing=True)  # the warning path others use (bench/large_pictures.py)
    assert "naev-data" in capsys.readouterr().err and all("naev" not in path for path, _, _ in found)
