"""Views cut by the model's device (classify.py --crop-on device): the same
bytes as Pillow's resize and the CPU path's crops, so the same scores. Runs on the CPU here."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_image


def pil_resize(pixels, size, resample):
    return np.asarray(PIL.Image.fromarray(pixels).resize(size, resample))


@pytest.mark.parametrize("resample", [PIL.Image.BILINEAR, PIL.Image.BICUBIC])
def test_resize_like_pil_gives_pillows_bytes(resample):
    from citytools.pil_resize import resize_like_pil

    rng = np.random.default_rng(int(resample))
    for trial in range(40):
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        out_height, out_width = (int(v) for v in rng.integers(1, 400, 2))
        if trial < 4:  # the edge cases: one axis kept, both kept, a 1-pixel image
            out_width, out_height = [(width, out_height), (out_width, height), (width, height), (1, 1)][trial]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if trial % 3 == 0:  # flat patches and hard edges, where rounding and negative lobes show
            pixels = np.repeat(np.repeat(pixels[::7, ::7], 7, 0), 7, 1)[:height, :width].copy()
        expected = pil_resize(pixels, (out_width, out_height), resample)
        got = resize_like_pil(torch.from_numpy(pixels), (out_width, out_height), resample).numpy()
        assert got.shape == expected.shape and np.array_equal(got, expected), \
            (trial, pixels.shape, out_width, out_height)
        left, top = int(rng.integers(0, out_width)), int(rng.integers(0, out_height))
        right, bottom = int(rng.integers(left + 1, out_width + 1)), int(rng.integers(top + 1, out_height + 1))
        window = resize_like_pil(torch.from_numpy(pixels), (out_width, out_height), resample,
                                                  (left, top, right, bottom)).numpy()
        assert np.array_equal(window, expected[top:bottom, left:right])


@pytest.mark.parametrize("size", [(2000, 1000), (700, 680), (900, 1603), (1537, 1600), (400, 3000), (10, 400),
                                  (336, 336), (673, 673)])
def test_device_views_are_the_cpu_crops(size):
    """The original's tiling rule (upscaling quirk included), five crops, CLIP's resize and crop."""
    from citytools.pil_resize import device_views
    from citytools.remote import CityClassifierImageProcessor

    processor = CityClassifierImageProcessor()
    image = make_image(*size, seed=sum(size))
    for tiling in (True, False):
        expected = np.stack([processor.resize_and_crop(view) for view in processor.views(image, tiling)])
        got = device_views(processor, torch.from_numpy(np.asarray(image)), tiling).numpy()
        assert got.shape == expected.shape and np.array_equal(got, expected), (size, tiling)


def test_where_views_are_cut():
    from citytools.remote import CityClassifierImageProcessor
    from citytools.views import crop_mode

    default, lanczos = CityClassifierImageProcessor(), CityClassifierImageProcessor(resample=PIL.Image.LANCZOS)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # crop_mode reads the type only
    assert crop_mode(gpu, [default]) == crop_mode(gpu, [default], "workers") == "uint8"
    assert crop_mode(gpu, [default], "device") == "device" and crop_mode(gpu, [lanczos]) == "uint8"
    assert crop_mode(cpu, [default]) == "normalised" and crop_mode(cpu, [default], "device") == "device"
    with pytest.raises(ValueError, match="BILINEAR or BICUBIC"):
        crop_mode(gpu, [lanczos], "device")
    with pytest.raises(ValueError, match="auto, workers or device"):
        crop_mode(cpu, [default], "gpu")


def test_classify_crop_on_device_scores_as_the_workers_crops(converted, tmp_path):
    from citytools.cli import classify

    root = tmp_path / "images"
    root.mkdir()
    for i, size in enumerate([(50, 40), (200, 130), (130, 400), (300, 300), (2000, 1000)]):
        make_image(*size, seed=i).convert("RGBA" if i == 1 else "RGB").save(root / f"img{i}.png")
    (root / "bad.png").write_text("not an image")
    outputs = {}
    for where in ("workers", "device"):
        out = tmp_path / f"{where}.jsonl"
        code = classify.main([str(root), "--model", str(converted["ca"]), str(converted["compression"]), "--out",
                              str(out), "--dtype", "float32", "--crop-on", where, "--workers", "1"])
        assert code == 1  # the bad file: an error row either way
        outputs[where] = {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}
    workers, device = outputs["workers"], outputs["device"]
    assert workers.keys() == device.keys() and len(workers) == 6
    for path, row in workers.items():
        other = device[path]
        assert (row["error"] is None) == (other["error"] is None) and row["width"] == other["width"]
        for key, value in row.items():
            if isinstance(value, float):
                assert abs(value - other[key]) < 1e-6, (path, key)


def test_head_only_embeddings_with_views_cut_on_the_device(converted, tmp_path):
    import datasets

    from citytools import embedding
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"])
    images = [make_image(*size, seed=i) for i, size in enumerate([(200, 130), (50, 40), (50, 300)])]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    ds = ds.cast_column("image", datasets.Image(decode=False))  # as train_hf loads its splits
    cpu = torch.device("cpu")
    embeds, mask = embedding.embed_all(ds, model, processor, 2, cpu, torch.float32, 0)
    cut, cut_mask = embedding.embed_all(ds, model, processor, 2, cpu, torch.float32, 0, crop="device")
    assert np.array_equal(mask, cut_mask) and mask.sum(1).tolist() == [5, 1, 1]
    assert np.abs(embeds - cut).max() < 1e-5


def test_head_only_embeddings_taken_out_of_order_go_back_to_their_images(converted, monkeypatch):
    """The embedding pass takes batches as the workers finish them: whatever order they come in, each
    image gets its own embeddings (batches handed over last-first here), and a lost image is an error."""
    import datasets

    from citytools import embedding, loading
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"])
    sizes = [(200, 130), (50, 40), (50, 300), (90, 60), (140, 140)]
    ds = datasets.Dataset.from_dict({"image": [make_image(*size, seed=i) for i, size in enumerate(sizes)]},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds = ds.cast_column("image", datasets.Image(decode=False))
    cpu = torch.device("cpu")
    alone = []
    with torch.inference_mode():  # each image alone, through the model's own forward: (real tiles, dim)
        for i, size in enumerate(sizes):
            inputs = processor(make_image(*size, seed=i), return_tensors="pt")
            alone.append(model(**inputs).image_embeds[0][inputs["tile_mask"][0].bool()].numpy())
    assert sorted({len(tiles) for tiles in alone}) == [1, 5]  # tiled and untiled images both
    real = loading.loader_batches
    monkeypatch.setattr(loading, "loader_batches", lambda *args, **kwargs: reversed(list(real(*args, **kwargs))))
    for warm_up in (False, True):  # a GPU's blank batch first (while the workers start): not among the images
        embeds, mask = embedding.embed_all(ds, model, processor, 2, cpu, torch.float32, 0, warm_up=warm_up)
        assert len(embeds) == len(mask) == len(sizes)
        for i, expected in enumerate(alone):
            assert mask[i].sum() == len(expected) and np.abs(embeds[i][mask[i].astype(bool)] - expected).max() < 1e-5
    monkeypatch.setattr(loading, "loader_batches", lambda *args, **kwargs: list(real(*args, **kwargs))[1:])
    with pytest.raises(RuntimeError, match="got 3 images for 5"):
        embedding.embed_all(ds, model, processor, 2, cpu, torch.float32, 0)


def test_workers_hand_out_small_batches_that_the_main_process_joins():
    """On a GPU each decoding worker fills small batches (batch / workers) and the main process
    joins them: the first full batch no longer waits for one worker to decode a whole batch."""
    from citytools.loading import collate, join_batches, micro_batch

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert micro_batch(64, 15, gpu) == 5 and micro_batch(8, 15, gpu) == 2 and micro_batch(64, 1, gpu) == 64
    assert micro_batch(8, 4, cpu) == 8  # a CPU's workers share the cores with the model: unchanged
    # handing an idle GPU a quarter batch (16 of 64): no worker's small batch is larger than half that
    assert micro_batch(64, 2, gpu, split=True) == 8 and micro_batch(64, 15, gpu, split=True) == 5
    assert micro_batch(64, 2, cpu, split=True) == 8 and micro_batch(8, 2, cpu, split=True) == 2

    def item(name, views):  # (meta, inputs) as FileStream yields; views None: an error row
        meta = {"path": name, "error": None if views else "bad"}
        tiles = np.full((views, 2, 2, 3), len(name), dtype=np.uint8) if views else None
        return meta, ([(tiles, 5, {})] if views else None)

    parts = [collate([item("a", 5), item("bb", 0)]), collate([item("ccc", 0)]), collate([item("dddd", 1)])]
    metas, grouped = join_batches(parts, cpu)
    assert [m["path"] for m in metas] == ["a", "bb", "ccc", "dddd"]
    tiles, mask, fringes = grouped[0]
    assert tiles.shape[0] == 6 and tiles[:5].eq(1).all() and tiles[5].eq(4).all()
    assert mask.sum(1).tolist() == [5, 1] and fringes == {}  # the decodable images only, in order
    assert join_batches([collate([item("e", 0)]), collate([item("f", 0)])], cpu)[1] is None

    from citytools.views import DeviceImage  # whole images for the device: lists, chained

    native = lambda p: {"fringe_values": np.full(13, p, np.float32),  # noqa: E731
                        "fringe_patches": np.full((4, 3, 8, 8), p, np.uint8)}
    whole = [collate([(meta, [(DeviceImage(np.zeros((3, 4, 3), np.uint8), 1), 5, native(p))])])
             for p, meta in enumerate(({"p": 1}, {"p": 2}))]
    metas, [(images, mask, fringes)] = join_batches(whole, cpu)
    assert fringes["fringe_values"].shape == (2, 13) and fringes["fringe_values"][:, 0].tolist() == [0.0, 1.0]
    assert fringes["fringe_patches"].shape == (2, 4, 3, 8, 8)  # each picture's, in order
    assert fringes["fringe_patches"][:, 0, 0, 0, 0].tolist() == [0, 1]
    assert len(images) == 2 and mask.sum(1).tolist() == [1, 1]


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "1"])
def test_device_views_of_non_rgb_images_keep_the_originals_order(mode):
    """A decoding worker hands the device `prepare`'s image: non-RGB modes already resized in their
    own mode (as the original did), so the device's crops equal the CPU's."""
    from citytools.pil_resize import device_views
    from citytools.remote import CityClassifierImageProcessor
    from citytools.views import view_tiles

    processor = CityClassifierImageProcessor()
    image = make_image(1700, 900, seed=3).convert(mode)
    whole = view_tiles(processor, image, True, "device")
    assert whole.views == 5 and whole.pixels.shape == (1536, 2901, 3)  # resized to the tiling size already
    expected = view_tiles(processor, image, True, "uint8")
    assert np.array_equal(device_views(processor, torch.from_numpy(whole.pixels), True).numpy(), expected)


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_cpu_cores_are_split_between_decoding_and_the_model_without_oversubscribing(monkeypatch, cores):
    """On a CPU, decoding workers and a small model's threads share the cores: together no more
    processes than cores (3 on 2 cores cost 10-30%), and neither side starved; a big model's threads
    take every core; feeding a GPU, every core but one decodes."""
    from citytools.devices import default_workers, model_threads

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    workers = default_workers(cpu)
    threads = model_threads(5_000_000, workers)
    assert threads >= 1 and max(workers, 1) + threads <= max(cores, 2)
    assert workers >= cores // 2 and threads >= cores // 2  # a side with a whole share each
    assert model_threads(400_000_000, workers) == cores
    assert default_workers(gpu) == max(1, cores - 1)
