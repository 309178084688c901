"""The model package: config, save/load, pipeline through remote code, parity with the original's formulas."""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from conftest import CLIP_SIZE, REPO, make_image
from PIL import Image
from safetensors.torch import load_file

# ---------------------------------------------------------------------------------------------
# An independent statement of ORIGINAL.md: PIL crops, transformers' own CLIPImageProcessor, the
# stock CLIPVisionModelWithProjection, the head as raw tensor maths on the released state dict.


def reference_views(image, tiling):
    s = CLIP_SIZE
    w, h = image.size
    if not tiling or min(w, h) <= 2 * s:
        return [image]
    if max(w, h) > 1536:
        if w < h:
            image = image.resize((1536, int(1536 * h / w)), Image.BILINEAR)
        else:
            image = image.resize((int(1536 * w / h), 1536), Image.BILINEAR)
    w, h = image.size
    t = 2 * s
    views = [image.crop((0, 0, t, t)), image.crop((w - t, 0, w, t)), image.crop((0, h - t, t, h)),
             image.crop((w - t, h - t, w, h))]
    top, left = int(round((h - t) / 2.0)), int(round((w - t) / 2.0))
    return views + [image.crop((left, top, left + t, top + t))]


def reference_head(state, x):
    lin = lambda name, v: v @ state[f"{name}.weight"].double().T + state[f"{name}.bias"].double()  # noqa: E731
    x = lin("up.0", x)
    y = torch.nn.functional.leaky_relu(lin("up.1.long.0", x), 0.1)
    y = torch.nn.functional.leaky_relu(lin("up.1.long.2", y), 0.1)
    x = torch.relu(lin("up.1.long.4", y) + x)
    x = lin("down.1", lin("down.0", x))
    x = torch.nn.functional.leaky_relu(x, 0.01)
    return lin("down.5", lin("down.4", x))


def reference_scores(image, clip_dir, head_file, arch="class", combine="mean", tiling=True):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    clip = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    # the original resized in the file's own mode, cropped, and its CLIPImageProcessor converted each
    # view with a plain convert("RGB") (newer transformers composite alpha on white: not the original)
    views = [view.convert("RGB") for view in reference_views(image, tiling and arch == "class")]
    with torch.no_grad():
        embeds = clip(**processor(views, return_tensors="pt")).image_embeds.double()
    z = reference_head(load_file(str(head_file)), embeds).numpy()
    if arch == "score":
        return (np.tanh(z) + 1) / 2
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return {"mean": np.mean, "median": np.median, "max": np.max, "min": np.min}[combine](p, axis=0)


def pipeline_scores(pipe, image, labels, **kwargs):
    result = {r["label"]: r["score"] for r in pipe(image, top_k=None, **kwargs)}
    return np.array([result[label] for label in labels])


# ---------------------------------------------------------------------------------------------


def test_config_rejects_bad_values_naming_the_field():
    from citytools.remote import CityClassifierConfig

    for kwargs, field in [({"arch": "regress"}, "arch"), ({"tile_combine": "avg"}, "tile_combine"),
                          ({"label_loss_weights": [1.0]}, "label_loss_weights"),
                          ({"head_hidden_size": 0}, "head_hidden_size"),
                          ({"arch": "score", "id2label": {0: "a", 1: "b"}}, "id2label")]:
        with pytest.raises(ValueError, match=field):
            CityClassifierConfig(**kwargs)


def test_config_defaults_fit_the_processor_and_leave_a_passed_vision_config_alone():
    from transformers import CLIPVisionConfig

    from citytools.remote import CityClassifierConfig, CityClassifierImageProcessor

    default = CityClassifierConfig()
    vision = default.vision_config  # ViT-L/14-336, as the original; the processor's default is 336 px
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.projection_dim) == \
        (1024, 24, 14, 768)
    assert default.pixel_size == CityClassifierImageProcessor().crop_size["height"] == 336
    assert default.problem_type == "multi_label_classification"
    assert CityClassifierConfig(arch="score", problem_type="regression").problem_type == "multi_label_classification"
    passed = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=7, patch_size=7, projection_dim=16)
    config = CityClassifierConfig(vision_config=passed, stem={"channels": [8], "kernel_sizes": [3], "pool": 6})
    assert config.vision_config.num_channels == 8 and passed.num_channels == 3  # a copy was changed


def test_save_and_load_round_trip(converted, tmp_path):
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = CityClassifierForImageClassification.from_pretrained(tmp_path).eval()
    inputs = processor([make_image(150, 90), make_image(40, 50)], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**inputs), again(**inputs)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForImageClassification"].startswith("modeling_cityclassifier.")
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["auto_map"]
    for name in ("modeling_cityclassifier.py", "configuration_cityclassifier.py", "image_processing.py", "fringes.py",
                 "native_fringes.py", "tiling.py"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("size", [(50, 40), (200, 130), (130, 400), (2000, 1000), (1000, 1700)],
                         ids=["small", "tiled", "odd-aspect", "quirk-upscale", "tall-downscale"])
@pytest.mark.parametrize("combine", ["mean", "median", "max", "min"])
def test_class_pipeline_matches_original_formulas(converted, tiny_clip, releases, size, combine):
    """Every construction reports the original's numbers: by path (our pipeline class, through the
    config), and transformers' stock pipeline built from loaded objects (a sigmoid of the logits)."""
    from transformers import ImageClassificationPipeline, pipeline

    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    image = make_image(*size, seed=size[0])
    for key, labels in (("ca", ["Pass", "Chromatic Aberration"]), ("compression", ["Pass", "JPEG", "WEBP"])):
        expected = reference_scores(image, tiny_clip, releases[key], combine=combine)
        model = CityClassifierForImageClassification.from_pretrained(converted[key], tile_combine=combine)
        processor = CityClassifierImageProcessor.from_pretrained(converted[key])
        stock = pipeline("image-classification", model=model, image_processor=processor)
        assert type(stock) is ImageClassificationPipeline
        ours = pipeline("image-classification", model=model, image_processor=str(converted[key]),
                        pipeline_class=_pipeline_class(), trust_remote_code=True)
        for pipe in (stock, ours):
            assert np.abs(pipeline_scores(pipe, image, labels) - expected).max() < 1e-5, type(pipe)


def _pipeline_class():
    from citytools.remote import CityClassifierImageClassificationPipeline

    return CityClassifierImageClassificationPipeline


def test_score_model_never_tiles_and_matches(converted, tiny_clip, releases):
    from transformers import pipeline

    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    ours = pipeline("image-classification", model=str(converted["score"]), trust_remote_code=True)
    stock = pipeline("image-classification", model=CityClassifierForImageClassification.from_pretrained(
        converted["score"]), image_processor=CityClassifierImageProcessor.from_pretrained(converted["score"]))
    for size in [(50, 40), (300, 200)]:
        image = make_image(*size)
        expected = reference_scores(image, tiny_clip, releases["score"], arch="score")
        for pipe in (ours, stock):
            result = pipe(image, top_k=None)
            assert len(result) == 1 and abs(result[0]["score"] - float(expected[0, 0])) < 1e-5, type(pipe)


def test_class_0_can_be_left_out_as_the_original_allows(converted, tiny_clip, releases):
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(converted["compression"]), trust_remote_code=True)
    image = make_image(200, 130)
    expected = reference_scores(image, tiny_clip, releases["compression"])
    result = pipe(image, top_k=None, drop_class_0=True)
    assert sorted(r["label"] for r in result) == ["JPEG", "WEBP"]
    assert np.abs(np.array([{r["label"]: r["score"] for r in result}[k] for k in ("JPEG", "WEBP")])
                  - expected[1:]).max() < 1e-5
    best = max(result, key=lambda r: r["score"])["label"]
    assert [r["label"] for r in pipe(image, top_k=1, drop_class_0=True)] == [best]
    assert len(pipe(image, top_k=None)) == 3  # kept by default


def test_tiling_off_matches_single_view(converted, tiny_clip, releases):
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    image = make_image(300, 200)
    expected = reference_scores(image, tiny_clip, releases["ca"], tiling=False)
    pipe.image_processor.tiling = False
    got = pipeline_scores(pipe, image, ["Pass", "Chromatic Aberration"])
    assert np.abs(got - expected).max() < 1e-5


def test_remote_code_in_a_fresh_process(converted, tiny_clip, releases, tmp_path):
    """Auto classes, options and pipeline from a plain folder, with the repo not importable."""
    image_path = tmp_path / "img.png"
    make_image(300, 200, seed=3).save(image_path)
    script = f"""
import json
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
folder = {str(converted['ca'])!r}
pipe = pipeline("image-classification", model=folder, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, tile_combine="max")
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, tiling=False)
pipe_max = pipeline("image-classification", model=model, image_processor=processor.__class__.from_pretrained(folder),
                    pipeline_class=type(pipe))
print(json.dumps({{"mean": pipe({str(image_path)!r}, top_k=None), "max": pipe_max({str(image_path)!r}, top_k=None),
                  "combine": model.config.tile_combine, "tiling": processor.tiling}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["combine"] == "max" and result["tiling"] is False
    image = Image.open(image_path)
    for combine in ("mean", "max"):
        got = {r["label"]: r["score"] for r in result[combine]}
        expected = reference_scores(image, tiny_clip, releases["ca"], combine=combine)
        assert abs(got["Chromatic Aberration"] - expected[1]) < 1e-5 and abs(got["Pass"] - expected[0]) < 1e-5


def test_batched_equals_one_at_a_time(converted):
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(converted["compression"]), trust_remote_code=True)
    images = [make_image(*s, seed=i) for i, s in enumerate([(40, 40), (2000, 1000), (130, 400), (70, 61), (200, 200)])]
    one = [pipe(im, top_k=None) for im in images]
    batched = pipe(images, top_k=None, batch_size=4)
    for a, b in zip(one, batched):
        a, b = ({r["label"]: r["score"] for r in rows} for rows in (a, b))
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long])
def test_scatter_tiles_puts_real_tiles_in_their_slots(mask_dtype):
    """Restated: the k-th real slot (row-major) of the mask gets the k-th value row, padding slots
    zeros; the mask may be bool or 0/1 ids (the pipeline's and the loader's)."""
    from citytools.remote import scatter_tiles

    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 1, 0]]).to(mask_dtype)
    values = torch.arange(9 * 3, dtype=torch.float32).view(9, 3) + 1
    out = scatter_tiles(values, mask)
    expected, k = torch.zeros(4, 5, 3), 0
    for b in range(4):
        for t in range(5):
            if mask[b, t]:
                expected[b, t], k = values[k], k + 1
    assert k == 9 and torch.equal(out, expected)
    with pytest.raises((IndexError, RuntimeError)):  # torch's wording differs by version
        scatter_tiles(values[:8], mask)  # one value short: an error, never a silent misplacement


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_on_cpu(converted, dtype):
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"], dtype=dtype).eval()
    inputs = CityClassifierImageProcessor.from_pretrained(converted["ca"])([make_image(200, 150)], return_tensors="pt")
    with torch.no_grad():
        half = model(**inputs).scores
        full = model.float()(**inputs).scores
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.05


def test_labels_give_a_weighted_loss_and_embeds_path_matches(converted):
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = CityClassifierForImageClassification.from_pretrained(converted["ca"]).eval()
    assert model.config.label_loss_weights == [1.0, 0.5]
    inputs = CityClassifierImageProcessor.from_pretrained(converted["ca"])(
        [make_image(50, 50), make_image(55, 45, seed=1)], tiling=False, return_tensors="pt")
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        again = model(image_embeds=out.image_embeds[:, 0], labels=labels)
    logp = out.scores.log()  # the original's weighted cross-entropy on the probabilities
    assert torch.allclose(torch.sigmoid(out.logits), out.scores, atol=1e-6)  # logits: their log-odds
    w = torch.tensor([1.0, 0.5])
    expected = -(w[labels] * logp[torch.arange(2), labels]).sum() / w[labels].sum()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(again.scores, out.scores, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1"])
def test_image_modes_are_converted_to_rgb_as_the_original(converted, tiny_clip, releases, mode):
    """Small, tiled without resizing, and tiled after the resize to 1536 px in the file's own mode."""
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    for size in [(150, 50), (150, 100), (1700, 900)]:
        image = make_image(*size, mode=mode)
        if mode in ("RGBA", "LA"):  # transparency that varies: premultiplied resizing shows
            image.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, size[::-1], dtype=np.uint8)))
        expected = reference_scores(image, tiny_clip, releases["ca"])
        got = pipeline_scores(pipe, image, ["Pass", "Chromatic Aberration"])
        assert np.abs(got - expected).max() < 1e-5, (size, got, expected)


def test_sixteen_bit_and_tiny_images(converted, tiny_clip, releases):
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    wide = (np.arange(150 * 100).reshape(100, 150) * 4).astype(np.uint16)
    image16 = Image.fromarray(wide)
    assert image16.mode.startswith("I;16")
    as8 = Image.fromarray(np.rint(wide / 257).astype(np.uint8))  # scaled, not clipped to white
    expected = reference_scores(as8, tiny_clip, releases["ca"])
    assert np.abs(pipeline_scores(pipe, image16, ["Pass", "Chromatic Aberration"]) - expected).max() < 1e-5
    one = pipe(Image.new("RGB", (1, 1), (200, 10, 10)), top_k=None)
    assert abs(sum(r["score"] for r in one) - 1) < 1e-5


def bomb_png(path, width=70000, height=70000):
    """A valid PNG header claiming width x height pixels: opening it must refuse, not allocate."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_clear_error(converted, tmp_path):
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    with pytest.raises(Image.DecompressionBombError):
        pipe(str(bomb_png(tmp_path / "bomb.png")))


def stem_model(aux_weight=0.5):
    from transformers import CLIPVisionConfig

    from citytools.remote import CityClassifierConfig, CityClassifierForImageClassification

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=CLIP_SIZE // 2, patch_size=5, projection_dim=16)
    config = CityClassifierConfig(vision_config=vision, head_hidden_size=32, head_dropout=0.0,
                                  stem={"channels": [6, 4], "kernel_sizes": [5, 3], "strides": [1, 1], "pool": 2},
                                  stem_aux_loss_weight=aux_weight)
    return CityClassifierForImageClassification(config)


def test_stem_config_sets_clip_channels_and_pixel_size():
    from citytools.remote import CityClassifierConfig

    model = stem_model()
    assert model.config.vision_config.num_channels == 4 and model.config.pixel_size == CLIP_SIZE
    assert model.clip.vision_model.embeddings.patch_embedding.in_channels == 4
    for stem in ({"channels": [4], "kernel_sizes": [4]}, {"channels": [4, 4], "kernel_sizes": [3]},
                 {"channels": [0]}, {"channels": [4], "pool": 0}):
        with pytest.raises(ValueError, match="stem"):
            CityClassifierConfig(stem=stem)


def test_stem_model_is_convolutions_then_clip_and_saves(tmp_path):
    """The stem written out as plain conv2d + GELU, fed to the model's own CLIP tower and head."""
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    model = stem_model().eval()
    processor = CityClassifierImageProcessor(size={"shortest_edge": CLIP_SIZE},
                                             crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    inputs = processor([make_image(150, 90), make_image(40, 50)], return_tensors="pt")
    state = model.state_dict()
    with torch.no_grad():
        out = model(**inputs)
        x = inputs["pixel_values"][0, :5]  # the first image's five tiles
        x = torch.nn.functional.gelu(torch.nn.functional.conv2d(x, state["stem.layers.0.weight"],
                                                                state["stem.layers.0.bias"], padding=2))
        x = torch.nn.functional.gelu(torch.nn.functional.conv2d(x, state["stem.layers.2.weight"],
                                                                state["stem.layers.2.bias"], padding=1))
        x = torch.nn.functional.max_pool2d(x, 2)
        assert x.shape[-1] == CLIP_SIZE // 2
        p = model.head(model.clip(pixel_values=x).image_embeds).softmax(-1).mean(0)
    assert torch.allclose(out.scores[0], p, atol=1e-6)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = CityClassifierForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(**inputs).scores, out.scores, atol=1e-6)


def test_stem_probe_loss_is_added_in_training_only():
    model = stem_model(aux_weight=0.5)
    pixels = torch.randn(3, 1, 3, CLIP_SIZE, CLIP_SIZE)
    labels = torch.tensor([1, 0, 1])
    model.eval()
    with torch.no_grad():
        plain = model(pixel_values=pixels, labels=labels).loss
        features = model.stem(pixels[:, 0])
        state = model.stem.probe.state_dict()
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], 1)
        probe = torch.log_softmax(pooled @ state["weight"].T + state["bias"], -1)
        probe_loss = -probe[torch.arange(3), labels].mean()
        model.train()  # no dropout in this model: only the probe term changes
        trained = model(pixel_values=pixels, labels=labels).loss
    assert torch.allclose(trained, plain + 0.5 * probe_loss, atol=1e-5)


def test_tools_reach_the_model_code_only_through_remote_code():
    """`cityclassifier.*` exists only once citytools registered it: a tool importing it directly breaks
    when it is the first import (benchmark.py on a Hub dataset did). citytools.remote and
    citytools.tiling are the ways in."""
    import re

    from citytools.toolkit import REMOTE_CODE_FILES

    tools = [p for p in REPO.glob("*.py") if p.name not in REMOTE_CODE_FILES]
    tools += [*(REPO / "bench").glob("*.py"), *(REPO / "citytools").rglob("*.py")]
    gates = {REPO / "citytools" / name for name in ("remote.py", "tiling.py")}  # the two ways in
    tools = [p for p in tools if p not in gates]
    offenders = [f"{p.name}:{n}" for p in tools for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*(from|import) cityclassifier\b", line)]
    assert len(tools) > 8 and offenders == []


def test_transformers_model_conventions(converted):
    """return_dict, hidden states and attentions, attn_implementation, gradient checkpointing and
    base_model behave as in CLIP's own classes."""
    from citytools.remote import CityClassifierForImageClassification, CityClassifierImageProcessor

    inputs = CityClassifierImageProcessor.from_pretrained(converted["ca"])(
        [make_image(200, 130), make_image(50, 40, seed=1)], return_tensors="pt")  # 5 + 1 real views
    model = CityClassifierForImageClassification.from_pretrained(converted["ca"], attn_implementation="eager").eval()
    assert model.clip.config._attn_implementation == "eager" and model.base_model is model.clip
    with torch.no_grad():
        out = model(**inputs, labels=torch.tensor([1, 0]), output_hidden_states=True, output_attentions=True)
        plain = model(**inputs, labels=torch.tensor([1, 0]), return_dict=False)
    layers = model.config.vision_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and out.hidden_states[0].shape[0] == 6
    heads = model.config.vision_config.num_attention_heads
    assert len(out.attentions) == layers and out.attentions[0].shape[:2] == (6, heads)
    assert isinstance(plain, tuple) and torch.allclose(plain[0], out.loss) and torch.allclose(plain[1], out.logits)
    model.train()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(**inputs, labels=torch.tensor([1, 0])).loss.backward()
    assert model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.grad is not None
