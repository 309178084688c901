"""classify.py: scores equal the pipeline's, resume, every bad input, filters, shared backbones, ranks."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_image, run_script_watching_imports, sigkill, start_held
from PIL import Image
from test_core import bomb_png


def run(*args):
    from citytools.cli import classify

    return classify.main([str(a) for a in args])


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def folder(tmp_path):
    """Good images of several sizes in nested folders."""
    root = tmp_path / "images"
    for i, size in enumerate([(50, 40), (200, 130), (130, 400), (61, 70), (300, 300), (90, 45)]):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        make_image(*size, seed=i).save(sub / f"img{i}.png")
    return root


def exif_rotated_jpeg(path):
    image = make_image(120, 80, seed=9)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(path, exif=exif)


def animated(path, fmt):
    frames = [make_image(80, 60, seed=s) for s in range(3)]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.fixture
def messy(tmp_path):
    """Every awkward input the issue names; value: True if it must score, else the expected error words."""
    root = tmp_path / "messy"
    root.mkdir()
    good = make_image(150, 100)
    buffer = io.BytesIO()
    good.save(buffer, "PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    # a JPEG header, then noise; seeded: about 1 noise in 40 reads as no JPEG at all ("not an image")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(500))
    (root / "notes.png").write_text("this is not an image")
    good.convert("CMYK").save(root / "cmyk.jpg")
    good.convert("P").save(root / "palette.png")
    good.convert("LA").save(root / "la.png")
    Image.fromarray((np.arange(100 * 150).reshape(100, 150) * 4).astype(np.uint16)).save(root / "sixteen.png")
    good.convert("RGBA").save(root / "rgba.png")
    animated(root / "anim.gif", "GIF")
    animated(root / "anim.webp", "WEBP")
    exif_rotated_jpeg(root / "rotated.jpg")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "one.png")
    make_image(20000, 50).save(root / "strip.png")
    bomb_png(root / "bomb.png")
    os.symlink(root / "does-not-exist.png", root / "broken.png")
    (root / "folder.png").mkdir()  # a folder with an image extension is walked, not scored
    expected = {
        "truncated.png": "cannot decode", "corrupt.jpg": "cannot decode", "notes.png": "not an image",
        "bomb.png": "decompression bomb", "broken.png": "broken symlink",
    }
    for name in ("cmyk.jpg", "palette.png", "la.png", "sixteen.png", "rgba.png", "anim.gif", "anim.webp",
                 "rotated.jpg", "one.png", "strip.png"):
        expected[name] = True
    return root, expected


def test_scores_equal_the_pipeline(converted, folder, tmp_path, capsys):
    from transformers import pipeline

    from citytools.loading import Stopwatch

    out = tmp_path / "r.jsonl"
    assert run(folder, "--model", converted["ca"], "--out", out, "--dtype", "float32", "--workers", 0,
               "--batch-size", 4, "--device", "cpu") == 0
    times = [line for line in capsys.readouterr().err.splitlines() if line.startswith("time: ")]
    assert len(times) == 1, times  # where the seconds went: phases of 0.01 s or more, so which ones show varies
    known = [re.escape(words).replace(r"\{:\.2f\}", r"\d+\.\d\d") for words in Stopwatch.PHASES.values()]
    parts = [part for part in times[0][len("time: "):].split(", ") if part]
    assert all(any(re.fullmatch(k, part) for k in known) for part in parts), times
    assert "warming" not in times[0]  # on a CPU the model is not warmed up: the blank batch would cost a batch
    rows = rows_of(out)
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    for row in rows:
        expected = {r["label"]: r["score"] for r in pipe(row["path"], top_k=None)}
        for label, score in expected.items():
            assert abs(row[f"ca:{label}"] - score) < 1e-5
        assert row["ca:top_label"] == max(expected, key=expected.get)
        assert (row["width"], row["height"]) == Image.open(row["path"]).size


def test_every_bad_input_gets_an_error_row_and_the_run_goes_on(converted, messy, tmp_path, capsys):
    root, expected = messy
    out = tmp_path / "r.jsonl"
    from transformers import pipeline

    assert run(root, "--model", converted["ca"], "--out", out, "--workers", 2) == 1  # some failed
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert set(rows) == set(expected)
    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    for name, want in expected.items():
        if want is True:  # scored as the pipeline scores the same file on its own
            assert rows[name]["error"] is None, (name, rows[name]["error"])
            alone = {r["label"]: r["score"] for r in pipe(str(root / name), top_k=None)}
            assert abs(rows[name]["ca:Pass"] - alone["Pass"]) < 1e-4, (name, rows[name], alone)
        else:
            assert want in rows[name]["error"] and "\n" not in rows[name]["error"], (name, rows[name]["error"])
    assert rows["rotated.jpg"]["width"] == 80 and rows["rotated.jpg"]["height"] == 120  # EXIF applied
    err = capsys.readouterr().err
    assert "5 failed" in err and "error: " in err and "bomb.png" in err


def test_missing_list_entries_and_bad_arguments(converted, folder, tmp_path):
    from citytools.toolkit import UsageError

    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'a' / 'img1.png'}\n{tmp_path / 'gone.png'}\n{folder}\n")
    out = tmp_path / "r.jsonl"
    assert run(f"@{listing}", "--model", converted["ca"], "--out", out, "--workers", 0) == 1
    rows = rows_of(out)
    errors = {Path(r["path"]).name: r["error"] for r in rows}
    assert len(rows) == 7  # img1.png named twice (itself and in its folder) has one row
    assert errors == {**{f"img{i}.png": None for i in range(6)}, "gone.png": "file not found"}  # the folder is walked
    with pytest.raises(UsageError, match="nope"):
        run(tmp_path / "nope", "--model", converted["ca"], "--out", out)
    with pytest.raises(UsageError, match="no such score column"):
        run(folder, "--model", converted["ca"], "--out", out, "--label", "Blurry", "--list")
    with pytest.raises(UsageError, match="cannot open the dataset"):
        run("--dataset", tmp_path / "nope", "--model", converted["ca"], "--out", tmp_path / "scored.jsonl")
    for args in ([folder, "--copy-to", tmp_path / "x"],  # filtering without --label
                 ["--dataset", folder, "--label", "Pass", "--move-to", tmp_path / "x"]):  # was ignored silently
        with pytest.raises(SystemExit) as exit_info:
            run(*args)
        assert exit_info.value.code == 2


@pytest.mark.parametrize("args", [["--help"], [], ["x", "--workers", "-1"]], ids=["help", "no-paths", "bad-number"])
def test_help_and_bad_arguments_are_answered_before_torch_is_imported(args):
    """`--help` took 8 s on a 2-core EPYC, nearly all of it importing torch and transformers."""
    code, torch_imported, transformers_imported, out, err = run_script_watching_imports("classify.py", args)
    help_asked = args == ["--help"]
    assert (code, torch_imported, transformers_imported) == (0 if help_asked else 2, False, False), err[-2000:]
    if help_asked:
        assert "--move-to DIR" in out and "datasets route" in out  # the whole help, as before
    else:
        assert err.strip().splitlines()[-1].startswith("classify.py: error: ")


def test_resume_after_sigkill_gives_each_file_once(converted, tmp_path):
    """The main process is SIGKILLed midway while its decoding worker lives on (frozen, so it cannot
    exit first): the immediate rerun takes the output's lock, which the worker must not hold, and
    resumes with every file once."""
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        make_image(64, 48, seed=i).save(root / f"{i:03d}.png")
    out = tmp_path / "r.jsonl"
    command = [sys.executable, str(REPO / "classify.py"), str(root), "--model", str(converted["ca"]), "--out",
               str(out), "--batch-size", "2", "--workers", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = start_held(command, env, 6, tmp_path / "held")
    workers = sigkill(process, freeze_children=True)
    try:
        assert workers, "the killed run had no decoding worker: the lock's inheritance went untested"
        before = len(out.read_text().splitlines())
        assert 6 <= before < 40, "the run should have been killed midway"
        with open(out, "a") as f:
            f.write('{"path": "torn-by-the-kill", "wid')  # a write cut short
        rerun = subprocess.run(command, env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    paths = [r["path"] for r in rows_of(out)]
    assert sorted(paths) == sorted(str(p) for p in root.iterdir())  # each exactly once, torn line gone


def test_csv_and_parquet_outputs_and_rerun_adds_only_new_files(converted, folder, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    assert run(folder, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    table = pq.read_table(out)
    assert table.num_rows == 6 and {"path", "error", "ca:Pass", "ca:Chromatic Aberration"} <= set(table.column_names)
    make_image(70, 70, seed=99).save(folder / "new.png")
    assert run(folder, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    assert sorted(pq.read_table(out).column("path").to_pylist()) == sorted(str(p) for p in folder.rglob("*.png"))
    csv_out = tmp_path / "r.csv"
    assert run(folder, "--model", converted["ca"], "--out", csv_out, "--workers", 0) == 0
    with open(csv_out) as f:
        assert len(list(csv.DictReader(f))) == 7


def test_list_copy_and_move_filters(converted, folder, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    run(folder, "--model", converted["ca"], "--out", out, "--workers", 0)
    rows = rows_of(out)
    threshold = float(np.median([r["ca:Chromatic Aberration"] for r in rows]))
    expected = sorted(r["path"] for r in rows if r["ca:Chromatic Aberration"] >= threshold)
    capsys.readouterr()
    run(folder, "--model", converted["ca"], "--out", out, "--label", "Chromatic Aberration", "--min", threshold,
        "--list")
    assert sorted(capsys.readouterr().out.split("\n")[:-1]) == expected

    copies = tmp_path / "copies"
    run(folder, "--model", converted["ca"], "--out", out, "--label", "ca:Chromatic Aberration", "--min", threshold,
        "--copy-to", copies, "--keep-structure")
    assert sorted(str(p.relative_to(copies)) for p in copies.rglob("*.png")) == \
        sorted(str(Path(p).relative_to(folder)) for p in expected)
    assert all(Path(p).exists() for p in expected)

    moved = tmp_path / "moved"
    clash = Path(expected[0]).name
    moved.mkdir()
    (moved / clash).write_bytes(b"someone else's file")
    run(folder, "--model", converted["ca"], "--out", out, "--label", "Chromatic Aberration", "--min", threshold,
        "--move-to", moved)
    assert (moved / clash).read_bytes() == b"someone else's file"  # never overwritten
    assert not any(Path(p).exists() for p in expected)
    assert len(list(moved.glob("*.png"))) == len(expected) + 1
    assert not list(moved.glob(".*partial"))


def test_two_models_share_one_backbone_pass_and_score_as_separately(converted, folder, tmp_path):
    both, ca, comp = tmp_path / "both.jsonl", tmp_path / "ca.jsonl", tmp_path / "comp.jsonl"
    assert run(folder, "--model", converted["ca"], converted["compression"], "--out", both, "--dtype", "float32",
               "--workers", 0) == 0
    assert run(folder, "--model", converted["ca"], "--out", ca, "--dtype", "float32", "--workers", 0) == 0
    assert run(folder, "--model", converted["compression"], "--out", comp, "--dtype", "float32", "--workers", 0) == 0
    separate = {r["path"]: r for r in rows_of(ca)}
    for r in rows_of(comp):
        separate[r["path"]].update(r)
    together = {r["path"]: r for r in rows_of(both)}
    assert len(together) == 6 and together.keys() == separate.keys()
    scores = {"ca:Pass", "ca:Chromatic Aberration", "compression:Pass", "compression:JPEG", "compression:WEBP"}
    for path, row in together.items():
        assert scores <= row.keys() and row["ca:top_label"] == separate[path]["ca:top_label"]
        for key in scores:
            assert abs(row[key] - separate[path][key]) < 1e-6, (path, key)


def test_backbone_runs_once_per_tile_for_shared_models(converted):
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"]), str(converted["compression"])], dtype="float32")
    model = scorer.groups[0][0].model
    calls = []
    original = model.get_image_features
    model.get_image_features = lambda x: calls.append(len(x)) or original(x)
    from citytools.loading import collate

    items = [(None, scorer.preprocess(make_image(200, 150))), (None, scorer.preprocess(make_image(40, 40)))]
    rows = scorer.score(collate(items)[1])
    assert calls == [6] and len(rows) == 2 and "compression:JPEG" in rows[0]  # 5 tiles + 1 view, one call


def test_a_run_held_up_by_decoding_says_so_and_what_may_help():
    """The note after the "time:" line: only when the model waited for decoded images over half of a
    run longer than 10 s; --crop-on device suggested on a GPU only."""
    import torch

    from citytools.cli.classify import decoding_hint
    from citytools.loading import Stopwatch

    watch = Stopwatch()
    watch.seconds = {"waiting_for_images": 12.0, "model": 6.0}
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    hint = decoding_hint(watch, 20.0, gpu, 15)
    assert hint.startswith("note: ") and "60%" in hint and "15 workers" in hint and "--crop-on device" in hint
    assert "--workers" in decoding_hint(watch, 20.0, cpu, 1) and "--crop-on" not in decoding_hint(watch, 20.0, cpu, 1)
    assert decoding_hint(watch, 30.0, gpu, 15) is None  # 40% of the run
    short = Stopwatch()
    short.seconds = {"waiting_for_images": 8.0}
    assert decoding_hint(short, 9.0, gpu, 15) is None  # a short run is mostly start-up


def test_warming_up_scores_a_blank_tiled_batch_and_changes_no_later_score(converted):
    """A GPU's fresh process warms the model up on blank images while the decoding workers start:
    every model's views of a tiled image, through the same path as the real batches, and nothing of
    it in the scores that follow."""
    from citytools.loading import blank_image, collate
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"]), str(converted["compression"])], dtype="float32")
    assert all(processor.is_tiled(*blank_image(scorer.processors).size) for processor in scorer.processors)
    items = [(None, scorer.preprocess(make_image(200, 150))), (None, scorer.preprocess(make_image(40, 40)))]
    before = scorer.score(collate(items)[1])
    model, calls = scorer.groups[0][0].model, []
    original = model.get_image_features
    model.get_image_features = lambda x: calls.append(len(x)) or original(x)
    rows = scorer.warm_up()
    assert calls == [20] and len(rows) == 4 and set(rows[0]) == set(before[0])  # 4 images x 5 tiles, both heads
    assert scorer.score(collate(items)[1]) == before


def test_two_process_gloo_run_merges_to_the_single_process_output(converted, folder, tmp_path):
    single, multi = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run(folder, "--model", converted["ca"], "--out", single, "--dtype", "float32", "--workers", 0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", str(REPO / "classify.py"), str(folder), "--model",
                           str(converted["ca"]), "--out", str(multi), "--dtype", "float32", "--workers", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = {r["path"]: r for r in rows_of(single)}
    two = {r["path"]: r for r in rows_of(multi)}
    assert len(rows_of(multi)) == len(two) == len(one) == 6
    for path, row in one.items():
        assert abs(row["ca:Pass"] - two[path]["ca:Pass"]) < 1e-6
    assert not list(tmp_path.glob("*part*"))


def test_fast_decode_only_where_the_image_is_downsized_anyway(converted, tmp_path):
    from citytools.images import load_image
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"])], dtype="float32")  # tiles of 60 px, resize limit 1536
    assert scorer.draft_short(1000, 800) is None  # tiles cut at full resolution
    assert scorer.draft_short(3500, 3100) == 1536  # resized to a 1536 short side before tiling
    assert scorer.draft_short(2500, 2000) is None  # a 1/2 decode would fall below 1536
    big = tmp_path / "big.jpg"
    make_image(3300, 3100, seed=5).save(big, quality=90)
    assert min(load_image(big, draft_short=scorer.draft_short).size) == 1550  # decoded at 1/2
    assert load_image(big).size == (3300, 3100)
    exact, fast = tmp_path / "exact.jsonl", tmp_path / "fast.jsonl"
    run(big, "--model", converted["ca"], "--out", exact, "--dtype", "float32", "--workers", 0)
    run(big, "--model", converted["ca"], "--out", fast, "--dtype", "float32", "--workers", 0, "--fast-decode")
    a, b = rows_of(exact)[0], rows_of(fast)[0]
    assert (a["width"], a["height"]) == (b["width"], b["height"]) == (3300, 3100)  # the file's size, not the draft's
    assert abs(a["ca:Pass"] - b["ca:Pass"]) < 0.02


def test_uint8_crops_normalised_on_the_device_score_as_the_float_tiles(converted):
    """The GPU path: workers send uint8 crops and the model's device normalises them."""
    import torch

    from citytools.loading import collate
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"]), str(converted["compression"])], dtype="float32")
    processor = scorer.groups[0][0].processor
    images = [make_image(200, 150, seed=1), make_image(40, 40, seed=2), make_image(61, 90, seed=3)]
    crops = [[(np.stack([processor.resize_and_crop(v) for v in processor.views(image)]), processor.tile_slots(), {})]
             for image in images]
    floats = [scorer.preprocess(image) for image in images]
    assert crops[0][0][0].dtype == np.uint8 and floats[0][0][0].dtype == np.float32
    normalised = processor.normalize_tensor(torch.from_numpy(crops[0][0][0])).numpy()
    assert np.array_equal(normalised, floats[0][0][0])  # bit-identical to the float path
    on_device = scorer.score(collate([(None, c) for c in crops])[1])
    on_cpu = scorer.score(collate([(None, f) for f in floats])[1])
    for a, b in zip(on_device, on_cpu):
        assert a.keys() == b.keys() and all(a[k] == b[k] if isinstance(a[k], str) else abs(a[k] - b[k]) < 1e-6
                                            for k in a)
