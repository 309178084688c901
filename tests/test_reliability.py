"""classify.py never loses a file or a row and never scores silently wrong: each case of issue #11,
and fault injection (SIGKILL at random points while scoring and at every step of --move-to)."""

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_image, sigkill, start_held
from safetensors.torch import load_file, save_file

from citytools.toolkit import UsageError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
EVERY = ["--label", "Chromatic Aberration", "--min", "0"]  # every scored file matches


def run(*args):
    from citytools.cli import classify

    return classify.main([str(a) for a in args])


def cli(*args, env=None, **kwargs):
    """classify.py in its own process: (exit status, stderr)."""
    done = subprocess.run([sys.executable, str(REPO / "classify.py"), *map(str, args)], env=env or ENV,
                          capture_output=True, **kwargs)
    return done.returncode, done.stderr.decode(errors="replace")


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def contents(*roots):
    """How many files hold each content, under `roots` (hidden files: ledger, locks, left-overs apart)."""
    found = Counter()
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.name.startswith(".") and path.suffix != ".jsonl":
                found[hashlib.sha256(path.read_bytes()).hexdigest()] += 1
    return found


def hidden_leftovers(*roots):
    return [p for root in roots for p in Path(root).rglob(".*.partial")]


def images(root, names, seed=0):
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_image(40 + 7 * i, 36, seed=seed + i).save(root / name)
    return root


@pytest.fixture
def clashing(tmp_path):
    """Three x.png in three folders (two byte-identical), a y.png, and a destination that already
    holds someone else's x.png identical to one of them."""
    src = images(tmp_path / "in", ["a/x.png", "c/x.png", "y.png"])
    (src / "b").mkdir()
    shutil.copy2(src / "a" / "x.png", src / "b" / "x.png")
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy2(src / "a" / "x.png", dest / "x.png")
    return src, dest


# ------------------------------------------------------------------------------------------ data loss


def test_move_to_an_input_folder_is_refused_and_one_inside_it_is_not_walked(converted, tmp_path):
    src = images(tmp_path / "in", ["a.png", "b.png", "sub/c.png", "sub/d.png"])
    before, out = contents(src), tmp_path / "r.jsonl"
    for dest, words in ((src, "is the input folder"), (tmp_path, "holds the input folder")):
        with pytest.raises(UsageError, match=words):
            run(src, "--model", converted["ca"], "--out", out, *EVERY, "--move-to", dest)
    assert contents(src) == before and not out.exists()
    rejected = src / "rejected"
    for _ in range(3):  # reruns neither delete nor nest what earlier runs moved
        assert run(src, "--model", converted["ca"], "--out", out, *EVERY, "--move-to", rejected,
                   "--keep-structure", "--workers", 0) == 0
        assert contents(src) == before
    assert sorted(str(p.relative_to(rejected)) for p in rejected.rglob("*.png")) == \
        ["a.png", "b.png", "sub/c.png", "sub/d.png"]
    assert len(rows_of(out)) == 4  # the moved files were never scored again


def test_identical_files_and_taken_names_all_survive_a_flat_move(converted, clashing, tmp_path):
    src, dest = clashing
    before = contents(src, dest)
    out = tmp_path / "r.jsonl"
    assert run(src, "--model", converted["ca"], "--out", out, *EVERY, "--move-to", dest, "--workers", 0) == 0
    assert contents(src, dest) == before
    assert not list(src.rglob("*.png"))
    assert sorted(p.name for p in dest.glob("*.png")) == ["x.png", "x_1.png", "x_2.png", "x_3.png", "y.png"]
    assert run(src, "--model", converted["ca"], "--out", out, *EVERY, "--move-to", dest, "--workers", 0) == 0
    assert contents(src, dest) == before and not hidden_leftovers(dest)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_whose_journal_was_deleted_keeps_its_rows(converted, tmp_path, suffix):
    import pyarrow.csv
    import pyarrow.parquet

    def table(path):
        return (pyarrow.parquet.read_table(path) if suffix == ".parquet" else pyarrow.csv.read_csv(path)).to_pylist()

    src = images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / f"r{suffix}"
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    first = {r["path"]: r["ca:Pass"] for r in table(out)}
    out.with_name(f".{out.name}.jsonl").unlink()
    images(src, ["d.png"], seed=9)
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    rows = table(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in src.glob("*.png"))  # each once
    assert all(abs(r["ca:Pass"] - first[r["path"]]) < 1e-9 for r in rows if r["path"] in first)


def test_a_file_at_the_output_path_that_classify_did_not_write_is_never_replaced(converted, tmp_path):
    """--out naming someone's own table or notes, with or without --no-resume: refused, untouched."""
    import pyarrow as pa
    import pyarrow.parquet

    src = images(tmp_path / "in", ["a.png"])
    theirs = {tmp_path / "people.csv": b"name,age\nalice,30\n", tmp_path / "notes.jsonl": b'{"todo": "x"}\n',
              tmp_path / "words.jsonl": b"hello"}
    for path, data in theirs.items():
        path.write_bytes(data)
    table = tmp_path / "table.parquet"
    pyarrow.parquet.write_table(pa.table({"name": ["alice"]}), table)
    theirs[table] = table.read_bytes()
    for out, data in theirs.items():
        for fresh in ([], ["--no-resume"]):
            with pytest.raises(UsageError, match="is not a classify.py output"):
                run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *fresh)
            assert out.read_bytes() == data
    assert not list(tmp_path.glob(".*"))  # nothing beside them: no journal, setup record or lock file
    ours = tmp_path / "ours.csv"
    for fresh in ([], ["--no-resume"]):  # its own output, resumed or replaced, as before
        assert run(src, "--model", converted["ca"], "--out", ours, "--workers", 0, *fresh) == 0


def test_a_file_system_without_locks_is_a_one_line_refusal(converted, tmp_path, monkeypatch):
    import fcntl

    from citytools import transfers

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    src = images(tmp_path / "in", ["a.png"])
    before = contents(src)
    with pytest.raises(UsageError, match="cannot be locked against a second writer") as info:
        run(src, "--model", converted["ca"], "--out", tmp_path / "r.jsonl", "--workers", 0)
    assert "\n" not in str(info.value) and not (tmp_path / "r.jsonl").exists()
    with pytest.raises(UsageError, match="cannot be locked against a second process"):
        transfers.Transfers(tmp_path / "dest", move=True)
    assert contents(src) == before


def test_a_second_writer_of_one_output_is_refused(converted, tmp_path):
    from citytools.results import ResultsStore

    src = images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "r.csv"
    holder = ResultsStore(out)
    holder.lock()  # as a running classify.py holds it
    code, err = cli(src, "--model", converted["ca"], "--out", out, "--workers", 0)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {out}: another process")
    assert not out.exists() and not out.with_name(f".{out.name}.jsonl").exists()
    holder.close()
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0) == 0

    from citytools.transfers import Transfers

    mover = Transfers(tmp_path / "dest", move=True)  # another run moving into the same folder
    with pytest.raises(UsageError, match="another process is copying or moving"):
        run(src, "--model", converted["ca"], "--out", tmp_path / "other.jsonl", *EVERY, "--move-to", tmp_path / "dest")
    mover.close()
    assert contents(src) == contents(images(tmp_path / "again", ["a.png", "b.png"]))  # nothing moved meanwhile


# ----------------------------------------------------------------------------------- wrong scores


def test_a_checkpoint_missing_weights_refuses_to_score(converted, tmp_path):
    from transformers import AutoModelForImageClassification, pipeline

    from citytools.scorer import Scorer

    state = load_file(str(converted["ca"] / "model.safetensors"))
    cases = {
        "headless": {k: v for k, v in state.items() if not k.startswith("head.")},
        "renamed": {k.replace("head.", "classifier.", 1): v for k, v in state.items()},
    }
    src = images(tmp_path / "in", ["a.png"])
    for name, broken_state in cases.items():
        broken = tmp_path / name
        shutil.copytree(converted["ca"], broken)
        save_file(broken_state, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(UsageError, match=r"missing keys \(16\): head\.down\.0\.bias"):
            run(src, "--model", broken, "--out", tmp_path / f"{name}.jsonl")
        assert not (tmp_path / f"{name}.jsonl").exists()
        with pytest.raises(ValueError, match="refusing to score"):
            Scorer([str(broken)])  # what benchmark.py and app.py load with
        with pytest.raises(ValueError, match="refusing to score"):
            AutoModelForImageClassification.from_pretrained(broken, trust_remote_code=True)
        with pytest.raises(ValueError, match="refusing to score"):
            pipeline("image-classification", model=str(broken), trust_remote_code=True)
    with pytest.raises(UsageError, match=r"unexpected keys \(16\): classifier\.down"):
        run(src, "--model", tmp_path / "renamed", "--out", tmp_path / "x.jsonl")


def test_resume_refuses_another_setup_and_names_no_resume(converted, tmp_path):
    src = images(tmp_path / "in", ["a.png", "b.png", "sub/c.png"])
    base = ["--workers", 0, "--dtype", "float32"]
    for out in (tmp_path / "r.jsonl", tmp_path / "r.csv"):
        assert run(src, "--model", converted["ca"], "--out", out, *base) == 0
        kept = out.read_bytes()
        retrained = tmp_path / "retrained" / "ca"  # same name, other weights
        shutil.copytree(converted["ca"], retrained, dirs_exist_ok=True)
        state = load_file(str(retrained / "model.safetensors"))
        state["head.down.5.bias"] = state["head.down.5.bias"] + 1
        save_file(state, str(retrained / "model.safetensors"), metadata={"format": "pt"})
        for change, words in (((converted["compression"],), "models"), ((retrained,), "ca weights differ"),
                              ((converted["ca"], "--combine", "max"), "ca combine mean -> max"),
                              ((converted["ca"], "--no-tiling"), "ca tiling True -> False")):
            with pytest.raises(UsageError, match=f"{words}.*--no-resume"):
                run(src, "--model", *change, "--out", out, *base)
            assert out.read_bytes() == kept  # nothing scored, nothing lost
        assert run(src, "--model", converted["ca"], "--combine", "max", "--out", out, "--no-resume", *base) == 0
    rows = rows_of(tmp_path / "r.jsonl")
    assert len(rows) == 3 and run(src, "--model", converted["ca"], "--combine", "max", "--out",
                                  tmp_path / "r.jsonl", *base) == 0  # the new setup resumes


def test_processor_and_pipeline_take_arrays_and_tensors_as_the_pil_image(converted):
    from transformers import pipeline

    from citytools.remote import CityClassifierImageProcessor

    processor = CityClassifierImageProcessor.from_pretrained(converted["ca"])
    image = make_image(150, 100, seed=3)  # tiled: five 60 px tiles
    pixels = np.asarray(image)
    expected = processor(image, return_tensors="np")["pixel_values"]
    same = {
        "numpy HWC": pixels, "numpy CHW": pixels.transpose(2, 0, 1), "numpy float": pixels / 255.0,
        "torch CHW": torch.from_numpy(pixels.transpose(2, 0, 1).copy()),
        "torch HWC": torch.from_numpy(pixels.copy()),
        "torch float CHW": torch.from_numpy(pixels.transpose(2, 0, 1) / 255.0).float(),
    }
    for name, value in same.items():
        got = processor(value, return_tensors="np")["pixel_values"]
        assert got.shape == expected.shape and np.abs(got - expected).max() == 0, name
    assert processor(np.stack([pixels, pixels]), return_tensors="np")["pixel_values"].shape[0] == 2
    grey = np.asarray(image.convert("L"))
    assert np.abs(processor(grey, return_tensors="np")["pixel_values"] -
                  processor(image.convert("L"), return_tensors="np")["pixel_values"]).max() == 0
    for bad, words in ((pixels * 2.0, r"float pixels must lie in \[0, 1\]"), ("x.png", "got str"),
                       (pixels[..., :2], "1, 3 or 4 channels"), (pixels.astype(np.int32) * 3, "0..255"),
                       (np.zeros((2, 2, 2, 2, 2)), "must be")):
        with pytest.raises((TypeError, ValueError), match=words):
            processor(bad)

    # call-time settings are honoured, as a processor saved with them gives
    options = {"size": {"shortest_edge": 20}, "crop_size": {"height": 20, "width": 20},
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.3, 0.4], "tile_resize_limit": 100}
    got = processor(image, return_tensors="np", **options)["pixel_values"]
    want = CityClassifierImageProcessor(**options)(image, return_tensors="np")["pixel_values"]
    assert got.shape == (1, 5, 3, 20, 20) and np.abs(got - want).max() == 0
    with pytest.raises(ValueError, match="do_resize=False"):
        processor(image, do_resize=False)
    with pytest.raises(TypeError, match="unknown argument.*sharpen"):
        processor(image, sharpen=True)

    pipe = pipeline("image-classification", model=str(converted["ca"]), trust_remote_code=True)
    reference = pipe(image, top_k=None)
    for name in ("torch CHW", "numpy float", "torch HWC"):
        assert pipe(same[name], top_k=None) == reference, name
    with pytest.raises(ValueError, match="pass a list of images"):
        pipe(torch.from_numpy(np.stack([pixels, pixels])))


# ------------------------------------------------------------------------------- crashes and errors


def test_a_file_name_that_is_not_utf8_gets_its_row(converted, tmp_path, capsysbinary):
    import pyarrow.csv

    src = images(tmp_path / "in", ["plain.png"])
    odd = os.fsdecode(b"caf\xe9-\xff.png")
    make_image(50, 40).save(os.path.join(src, odd))
    out = tmp_path / "r.jsonl"
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--list") == 0
    listed = capsysbinary.readouterr().out.splitlines()
    assert sorted(listed) == sorted([os.fsencode(str(src / "plain.png")), os.fsencode(os.path.join(src, odd))])
    from citytools import results as results_store

    rows = list(results_store.read_rows(out))
    assert sorted(r["path"] for r in rows) == sorted([str(src / "plain.png"), os.path.join(src, odd)])
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0) == 0  # resumes: nothing twice
    assert len(rows_of(out)) == 2
    table = tmp_path / "r.csv"
    assert run(src, "--model", converted["ca"], "--out", table, "--workers", 0) == 0
    assert any("caf\\xe9-\\xff.png" in p for p in pyarrow.csv.read_csv(table).column("path").to_pylist())
    moved = tmp_path / "moved"
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--move-to", moved) == 0
    assert sorted(os.listdir(moved)) == sorted([".classify-transfers.jsonl", "plain.png", odd])


def test_a_strip_that_would_be_upscaled_is_refused_and_the_max_pixels_option(converted, tmp_path, capsys):
    from citytools.cli import classify
    from citytools.toolkit import MAX_PIXELS

    src = tmp_path / "in"
    src.mkdir()
    make_image(10000, 3).save(src / "strip.png")  # not tiled; CLIP's short-edge resize to 30 px: 100000x30
    make_image(70, 40).save(src / "fine.png")
    out = tmp_path / "r.jsonl"
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0, "--max-pixels", 1_000_000) == 1
    errors = {Path(r["path"]).name: r["error"] for r in rows_of(out)}
    assert errors["fine.png"] is None and "too large to process" in errors["strip.png"]
    assert f"{100000 * 30} pixels" in errors["strip.png"]
    assert errors["strip.png"].endswith("over the 1000000 limit (see --max-pixels)")  # the command line adds its flag
    from citytools.images import BadImage, load_image

    with pytest.raises(BadImage) as refused:  # the engine, as train_hf and benchmark call it, names no flag
        load_image(str(src / "strip.png"), 1_000_000, work_pixels=lambda w, h: 100 * w * h)
    assert "--" not in str(refused.value)
    with pytest.raises(SystemExit) as exit_info:
        classify.parse_args([str(src), "--max-pixels", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        classify.parse_args(["--help"])
    assert f"default: {MAX_PIXELS}" in capsys.readouterr().out


def test_a_decoding_process_killed_by_the_kernel_costs_one_error_row(converted, tmp_path):
    src = images(tmp_path / "in", [f"{i:02d}.png" for i in range(12)])
    make_image(50, 50, seed=99).save(src / "victim.png")
    out = tmp_path / "r.jsonl"
    env = {**ENV, "CITYCLASSIFIER_KILL_WORKER_ON": "victim.png"}
    code, err = cli(src, "--model", converted["ca"], "--out", out, "--workers", 2, "--batch-size", 2, env=env,
                    timeout=300)
    assert code == 1, err[-2000:]
    rows = rows_of(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in src.iterdir())  # each once
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert list(errors) == ["victim.png"] and "died" in errors["victim.png"]


def test_a_handover_cut_by_a_dying_worker_restarts_the_loader_and_scores_each_file_once(converted, tmp_path,
                                                                                     monkeypatch):
    """A worker killed while the main process fetches its batch's shared memory surfaces as EOFError
    (seen under load, where the kill test flaked): handled as a death, not a traceback."""
    from citytools.cli import classify
    from citytools.loading import loader_batches

    src = images(tmp_path / "in", [f"{i:02d}.png" for i in range(10)])
    calls = []

    def cut_once(*args, **kwargs):
        calls.append(1)
        batches = loader_batches(*args, **kwargs)
        if len(calls) == 1:
            yield next(batches)
            batches.close()
            raise EOFError
        yield from batches

    monkeypatch.setattr(classify, "loader_batches", cut_once)
    out = tmp_path / "r.jsonl"
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 2, "--batch-size", 2) == 0
    rows = rows_of(out)
    assert len(calls) == 2 and not any(r["error"] for r in rows)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in src.iterdir())  # each once


def feed_paths(converted, paths, workers, done=()):
    """Every meta path that loader_batches hands over, scoring FileStream's files with `workers`."""
    from citytools.discovery import path_key
    from citytools.loading import FileStream, loader_batches
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"])], device="cpu", dtype="float32")
    stream = FileStream([str(p) for p in paths], scorer, np.array(sorted(path_key(str(p)) for p in done)), 0, 1,
                        None)
    return [meta["path"] for metas, _ in loader_batches(stream, 4, workers, torch.device("cpu")) for meta in metas]


def test_workers_take_files_from_one_queue_each_file_once(converted, tmp_path):
    """Files reach the decoding workers through one queue, fed by one walk: every file not done is
    handed over once, also when it is named twice, whichever worker takes it."""
    src = images(tmp_path / "in", [f"{i:02d}.png" for i in range(20)] + ["sub/x.png"])
    done = src / "03.png"
    paths = feed_paths(converted, [src, src / "05.png", src / "sub"], 3, done=[done])
    assert sorted(paths) == sorted(str(p) for p in src.rglob("*.png") if p != done)


def batches_handed_over(converted, src, idle):
    """(images per batch, paths handed over, live child processes when on_start ran) of loader_batches
    over `src` with 2 workers, batch 8, and `idle` as the device's state."""
    import multiprocessing

    from citytools.loading import FileStream, loader_batches
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"])], device="cpu", dtype="float32")
    stream = FileStream([str(src)], scorer, np.array([], dtype=np.int64), 0, 1, None)
    started, sizes, paths = [], [], []
    on_start = lambda: started.append(len(multiprocessing.active_children()))  # noqa: E731
    for metas, _ in loader_batches(stream, 8, 2, torch.device("cpu"), idle=idle, on_start=on_start):
        assert started, "on_start runs before the first batch"
        sizes.append(len(metas))
        paths += [meta["path"] for meta in metas]
    return sizes, sorted(paths), started


def test_an_idle_device_gets_the_images_decoded_so_far_a_busy_one_a_whole_batch(converted, tmp_path):
    """With `idle` (a GPU's queue), a batch goes as soon as it holds a quarter of the batch size while
    the device has nothing to do, so it starts on the first images and ends on a small batch; while
    it is busy, whole batches. Either way each file once, and on_start runs once, with the workers
    started (the model warms up while they decode)."""
    from citytools.loading import first_batch

    src = images(tmp_path / "in", [f"{i:02d}.png" for i in range(16)])
    every = sorted(str(p) for p in src.iterdir())
    sizes, paths, started = batches_handed_over(converted, src, idle=lambda: True)
    assert paths == every and len(started) == 1 and started[0] >= 2
    assert first_batch(8) == 2 and max(sizes) < 8  # the workers' small batches (4), each handed over at once
    sizes, paths, started = batches_handed_over(converted, src, idle=lambda: False)
    assert paths == every and len(started) == 1
    assert sizes == [8, 8]  # joined up to the batch size: 16 images, two batches


def test_the_stopwatch_tells_the_wait_for_the_first_item_from_the_others():
    """classify.py's "time:" line: each phase's seconds; an iterator's first wait apart from the rest
    (the decoding workers' start), the loop body's own phases not counted as waits; phases under
    0.005 s left out."""
    from citytools.loading import Stopwatch

    # the clock's readings, in the order the stopwatch reads them
    ticks = iter([0.0, 3.0,  # waiting for "a"
                  3.0, 4.0,  # waiting for "b"
                  4.0, 6.0,  # the model, in the loop body
                  6.0, 6.5,  # waiting for "c"
                  6.5, 6.501,  # waiting for the end
                  7.0, 7.004])  # writing, after the loop: under 0.005 s
    watch = Stopwatch(clock=lambda: next(ticks))
    got = []
    for item in watch.timed("abc", "first_batch", "waiting_for_images"):
        got.append(item)
        if item == "b":
            with watch("model"):
                pass
    with watch("writing"):
        pass
    assert got == ["a", "b", "c"]
    assert watch.seconds == pytest.approx({"first_batch": 3.0, "waiting_for_images": 1.501, "model": 2.0,
                                           "writing": 0.004})
    assert watch.line() == "first batch after 3.00s, 1.50s waiting for decoded images, 2.00s in the model"
    assert watch.line({"model": "model {:.1f}", "table": "table {:.1f}"}) == "model 2.0"


def test_a_walk_that_fails_midway_raises_after_the_files_it_found(converted, tmp_path, monkeypatch):
    """The walk runs in a thread of the main process: an error there must end the run with that error
    once the files found before it are handed over, never end it early as if all were done."""
    from citytools.loading import FileStream

    src = images(tmp_path / "in", ["a.png", "b.png", "c.png"])

    def failing(self):
        yield from sorted(str(p) for p in src.iterdir())
        raise OSError("the disk went away")

    monkeypatch.setattr(FileStream, "pending", failing)
    seen = []
    with pytest.raises(OSError, match="the disk went away"):
        from citytools.loading import loader_batches
        from citytools.scorer import Scorer

        scorer = Scorer([str(converted["ca"])], device="cpu", dtype="float32")
        stream = FileStream([str(src)], scorer, np.array([], dtype=np.int64), 0, 1, None)
        for metas, _ in loader_batches(stream, 2, 2, torch.device("cpu")):
            seen += [meta["path"] for meta in metas]
    assert sorted(seen) == sorted(str(p) for p in src.iterdir())


def test_decoding_workers_end_when_the_main_process_is_killed(converted, tmp_path):
    """A worker waiting for its next file from the queue notices that the main process is gone and
    ends, instead of waiting forever (the queue's write end lives on in the workers themselves)."""
    src = images(tmp_path / "in", ["a.png", "b.png"])
    script = tmp_path / "main.py"
    script.write_text(f"""
import sys, time, numpy as np, torch
sys.path.insert(0, {str(REPO)!r})
from citytools.loading import FileStream, loader_batches
from citytools.scorer import Scorer
scorer = Scorer([{str(converted["ca"])!r}], device="cpu", dtype="float32")
stream = FileStream([{str(src)!r}], scorer, np.array([], dtype=np.int64), 0, 1, None)
def slow_walk(self):  # the feeder finds nothing more for a long while: the workers wait on the queue
    yield {str(src / "a.png")!r}
    time.sleep(600)
FileStream.pending = slow_walk
for metas, _ in loader_batches(stream, 1, 2, torch.device("cpu")):
    print("ready", flush=True)
    time.sleep(600)
""")
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert child.stdout.readline().strip() == b"ready"
        workers = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
                   if stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[1] == str(child.pid)]
        assert len(workers) == 2
    finally:
        child.kill()
        child.wait()

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 60  # they look once a second; the deadline only bounds a failure
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


def test_paths_left_in_the_queue_of_dead_workers_do_not_keep_the_process_alive(tmp_path):
    """After a worker's death the loader restarts with a new queue; the old one may hold more paths
    than its pipe takes. multiprocessing would then wait forever at exit to flush them."""
    script = tmp_path / "main.py"
    script.write_text(f"""
import sys, time, numpy as np
sys.path.insert(0, {str(REPO)!r})
from citytools.loading import FileStream
stream = FileStream([], None, np.array([], dtype=np.int64), 0, 1, None)
FileStream.pending = lambda self: ("/" + "x" * 2000 + str(i) for i in range(10 ** 6))
start, stop, error = stream.feed(2)  # no worker ever reads: the queue fills, then its pipe
start()
while stream.queue.qsize() < 128:  # full (64 a worker): about 256 KB, four times a pipe's 64 KB
    time.sleep(0.05)
stop()
print("done", flush=True)
""")
    done = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == b"done", done.stderr[-2000:]


def test_exit_status_2_with_one_line_for_what_cannot_work(converted, tmp_path, monkeypatch):
    from citytools.cli import classify

    src = images(tmp_path / "in", ["a.png"])
    model = ["--model", converted["ca"]]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "folder.jsonl").mkdir()
    refused = [
        ([src, *model, "--device", "xyz"], "not a device"),
        ([src, *model, "--out", tmp_path / "folder.jsonl"], "is a folder"),
        ([src, *model, "--out", a_file / "r.jsonl"], "cannot write"),
        ([src, *model, "--out", tmp_path / "r.jsonl", *EVERY, "--copy-to", a_file], "not a folder"),
        ([src, "--model", tmp_path / "nope", "--out", tmp_path / "r.jsonl"], "no such model folder"),
    ]
    if not torch.cuda.is_available():
        refused.append(([src, *model, "--device", "cuda"], "CUDA is not available"))
    pickled = tmp_path / "pickled"
    shutil.copytree(converted["ca"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    refused.append(([src, "--model", pickled, "--out", tmp_path / "r.jsonl"], "no model.safetensors"))
    wrong = tmp_path / "wrong"
    shutil.copytree(converted["ca"], wrong)
    state = load_file(str(wrong / "model.safetensors"))
    state["head.down.5.weight"] = torch.zeros(7, 32)
    save_file(state, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    refused.append(([src, "--model", wrong, "--out", tmp_path / "r.jsonl"], "head.down.5.weight"))
    for args, words in refused:
        with pytest.raises(UsageError, match=words) as info:
            run(*args)
        assert "\n" not in str(info.value)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(UsageError, match="no such model folder"):
        run(src, "--model", "models/ca", "--out", tmp_path / "r.jsonl")  # shaped like a Hub id, meant locally
    assert time.monotonic() - started < 30  # no Hub retries
    for bad in (["--min", "nan"], ["--max", "inf"], ["--threads", "-3"], ["--max-pixels", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            classify.parse_args([str(src), "--label", "Pass", *bad])
        assert exit_info.value.code == 2
    # the output still holds error rows from an earlier run: exit 1 again, not 0
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "errors.jsonl"
    assert run(src, *model, "--out", out, "--workers", 0) == 1
    assert run(src, *model, "--out", out, "--workers", 0) == 1
    assert len(rows_of(out)) == 2
    # a real process: exit status 2 and a one-line error
    code, err = cli(src, *model, "--device", "xyz", "--out", tmp_path / "r.jsonl")
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: --device xyz: not a device (use auto, cpu, cuda or cuda:N)"


def test_a_full_disk_mid_run_keeps_the_rows_so_far_and_exits_2(converted, tmp_path):
    src = images(tmp_path / "in", [f"{i:02d}.png" for i in range(12)])
    out = tmp_path / "r.jsonl"

    def small_disk():  # files may not grow past 1500 bytes: writes fail as on a full disk (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    code, err = cli(src, "--model", converted["ca"], "--out", out, "--workers", 0, "--batch-size", 1,
                    preexec_fn=small_disk)
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: {out}: cannot write") and "rerun" in err
    kept = rows_of(out)  # every line whole
    assert 0 < len(kept) < 12 and out.read_bytes().endswith(b"\n")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".recovering"))]
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    assert sorted(r["path"] for r in rows_of(out)) == sorted(str(p) for p in src.iterdir())


# ------------------------------------------------------------------------------------------- paths


def test_one_row_per_file_however_it_is_named(converted, tmp_path, monkeypatch):
    src = images(tmp_path / "good", ["a.png", "sub/b.png"])
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("good\n")
    out = tmp_path / "r.jsonl"
    assert run("good", "./good", src, f"@{listing}", "good/a.png", "--model", converted["ca"], "--out", out,
               "--workers", 0) == 0
    assert sorted(r["path"] for r in rows_of(out)) == [str(src / "a.png"), str(src / "sub" / "b.png")]
    assert run("./good/", "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    assert len(rows_of(out)) == 2


def test_symlinked_folders_are_followed_once_and_loops_end(converted, tmp_path, capsys):
    from citytools.cli.benchmark import load_records

    store = images(tmp_path / "store", ["clean/a.png", "clean/b.png", "fringes/c.png"])
    data = images(tmp_path / "data", ["own.png"])
    os.symlink(store / "clean", data / "linked")
    os.symlink(data, data / "loop")  # a loop back to the top
    out = tmp_path / "r.jsonl"
    assert run(data, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    paths = sorted(r["path"] for r in rows_of(out))
    assert paths == [str(data / "linked" / "a.png"), str(data / "linked" / "b.png"), str(data / "own.png")]
    assert "symlink loop" in capsys.readouterr().err  # said, not silent
    dataset = tmp_path / "dataset"
    (dataset / "test").mkdir(parents=True)
    os.symlink(store / "clean", dataset / "test" / "0_clean")
    os.symlink(store / "fringes", dataset / "test" / "1_fringes")
    records = load_records(str(dataset), "test")
    assert sorted((Path(r["path"]).name, r["label"]) for r in records) == [("a.png", 0), ("b.png", 0), ("c.png", 1)]


# --------------------------------------------------------------------------------- fault injection


def test_sigkill_at_random_points_while_scoring_then_resume(converted, tmp_path):
    """Three runs, each SIGKILLed after a number of rows the seed draws (held there, so the kill lands
    where the seed says) and rerun at once, then a last run: every file exactly once."""
    src = images(tmp_path / "in", [f"{i:02d}.png" for i in range(60)])
    out = tmp_path / "r.csv"
    journal = tmp_path / ".r.csv.jsonl"
    command = [sys.executable, str(REPO / "classify.py"), str(src), "--model", str(converted["ca"]), "--out",
               str(out), "--batch-size", "2", "--workers", "1"]
    rng = np.random.default_rng(11)
    for _ in range(3):
        have = len(journal.read_text().splitlines()) if journal.exists() else 0
        rows = int(rng.integers(1, 6))  # this run is killed once it has written this many rows
        sigkill(start_held(command, ENV, rows, tmp_path / "held"))
        now = len(journal.read_text().splitlines())
        assert have + rows <= now < have + rows + 2, (have, rows, now)  # batches of 2: killed where drawn
    assert len(journal.read_text().splitlines()) < 60, "the runs should have been killed midway"
    assert subprocess.run(command, env=ENV, capture_output=True).returncode == 0
    import pyarrow.csv

    paths = pyarrow.csv.read_csv(out).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in src.iterdir())  # each exactly once
    assert not list(tmp_path.glob(".r.csv.tmp"))


def test_a_lock_is_freed_by_its_holders_death_while_its_forked_child_lives(tmp_path):
    """The output's and the destination's locks belong to the process that took them: a child it
    forks (a decoding worker) does not keep them after the parent is SIGKILLed."""
    out, dest = tmp_path / "r.jsonl", tmp_path / "dest"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from citytools.results import ResultsStore\nfrom citytools.transfers import Transfers\n"
              f"ResultsStore({str(out)!r}).lock(); Transfers({str(dest)!r}, move=False)\n"
              "child = os.fork()\n"  # the child says its pid after the at-fork hooks ran: no race with them
              "if child == 0:\n    print(os.getpid(), flush=True)\n    os.kill(os.getpid(), signal.SIGSTOP)\n"
              "    os._exit(0)\n"
              "signal.pause()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        from citytools.results import ResultsStore
        from citytools.transfers import Transfers

        with pytest.raises(UsageError, match="another process"):
            ResultsStore(out).lock()  # held while the parent lives: the lock works
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert os.path.exists(f"/proc/{child}")  # the child lives on, stopped
        store = ResultsStore(out)
        store.lock()
        store.close()
        Transfers(dest, move=False).close()
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.fixture
def trial(converted, clashing, tmp_path):
    """The clashing folders scored once and kept aside: `trial.restore()` puts both back for each kill."""

    class Trial:
        src, dest = clashing
        pristine, pristine_dest = tmp_path / "pristine", tmp_path / "pristine-dest"
        out = tmp_path / "r.jsonl"

        def restore(self):
            shutil.rmtree(self.src)
            shutil.rmtree(self.dest)
            shutil.copytree(self.pristine, self.src, copy_function=shutil.copy2)
            shutil.copytree(self.pristine_dest, self.dest)

    t = Trial()
    shutil.copytree(t.src, t.pristine, copy_function=shutil.copy2)
    shutil.copytree(t.dest, t.pristine_dest)
    t.before = contents(t.src, t.dest)
    assert run(t.src, "--model", converted["ca"], "--out", t.out, "--workers", 0) == 0
    return t


class Killed(BaseException):
    """Stands for SIGKILL inside the test process: nothing after the step runs, no handler sees it."""


def without_hard_links(monkeypatch):
    """Makes every hard link fail as on exFAT or FAT (link(2): EPERM), in this process."""
    from citytools import transfers

    def link(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(transfers.os, "link", link)


@pytest.mark.parametrize("placing", ["links", "renames"])
@pytest.mark.parametrize("mode", ["--move-to", "--copy-to"])
def test_a_transfer_killed_after_any_step_is_finished_by_a_rerun(converted, trial, monkeypatch, mode, placing):
    """With hard links (5 steps a file) and on a destination without them (renames that refuse to
    overwrite, after a ledger line: 6 steps)."""
    from citytools import transfers

    src, dest, out, before, pristine = trial.src, trial.dest, trial.out, trial.before, trial.pristine
    original_step = transfers.Transfers.step
    kill_at = {"n": 0}

    def step(self):
        original_step(self)
        if self.steps == kill_at["n"]:
            raise Killed()

    monkeypatch.setattr(transfers.Transfers, "step", step)
    if placing == "renames":
        without_hard_links(monkeypatch)
    steps = 5 if placing == "links" else 6
    killed = 0
    for n in range(1, 4 * steps + 1):  # 4 files, at most `steps` steps each
        trial.restore()
        kill_at["n"] = n
        try:
            run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, mode, dest)
        except Killed:
            killed += 1
        kill_at["n"] = 0
        assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, mode, dest) == 0
        placed = contents(dest) - contents(trial.pristine_dest)
        if mode == "--move-to":
            assert contents(src, dest) == before, n
            assert not list(src.rglob("*.png")), n
        else:
            assert contents(src) == contents(pristine) and placed == contents(pristine), n
        assert not hidden_leftovers(dest), n
        assert sorted(p.name for p in dest.glob("*.png")) == ["x.png", "x_1.png", "x_2.png", "x_3.png", "y.png"], n
    assert killed == 4 * (steps if mode == "--move-to" else steps - 1)  # a copy has no source to unlink


def test_sigkill_of_a_real_move_at_random_steps(converted, trial):
    src, dest, out, before = trial.src, trial.dest, trial.out, trial.before
    args = [src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--move-to", dest]
    for n in np.random.default_rng(5).choice(np.arange(1, 21), 2, replace=False):
        trial.restore()
        code, _ = cli(*args, env={**ENV, "CITYCLASSIFIER_KILL_AT_TRANSFER_STEP": str(n)})
        assert code == -signal.SIGKILL
        assert cli(*args)[0] == 0
        assert contents(src, dest) == before and not list(src.rglob("*.png")) and not hidden_leftovers(dest)


def test_a_rename_cut_short_twice_never_takes_an_identical_file_for_its_copy(tmp_path, monkeypatch):
    """Without hard links, a rerun that finds neither the staged copy nor a finished ledger line
    looks for the copy by its bytes. Killed once before the rename and once while staging again,
    the third run must not take the destination's identical x.png for it and unlink the source."""
    from citytools import transfers

    without_hard_links(monkeypatch)
    src = images(tmp_path / "in", ["x.png"])
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy2(src / "x.png", dest / "x.png")
    before = contents(src, dest)
    original_step, real_copy = transfers.Transfers.step, shutil.copy2

    def killed_after_the_ledger_line(self):
        original_step(self)
        if self.steps == 2:
            raise Killed()

    def killed_while_copying(source, target, **kwargs):
        raise Killed()

    for attempt in (killed_after_the_ledger_line, None):
        if attempt is None:
            monkeypatch.setattr(transfers.shutil, "copy2", killed_while_copying)
        else:
            monkeypatch.setattr(transfers.Transfers, "step", attempt)
        mover = transfers.Transfers(dest, move=True)
        with pytest.raises(Killed):
            mover.transfer(src / "x.png", Path("x.png"))
        mover.close()
        monkeypatch.setattr(transfers.Transfers, "step", original_step)
    monkeypatch.setattr(transfers.shutil, "copy2", real_copy)
    mover = transfers.Transfers(dest, move=True)
    assert mover.transfer(src / "x.png", Path("x.png")) == (dest / "x_1.png", True)
    mover.close()
    assert contents(src, dest) == before and not (src / "x.png").exists()


def test_a_rename_that_fails_leaves_nothing_for_a_rerun_to_take_for_its_copy(tmp_path, monkeypatch):
    from citytools import transfers

    without_hard_links(monkeypatch)
    src = images(tmp_path / "in", ["x.png"])
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy2(src / "x.png", dest / "x.png")
    before, real_rename = contents(src, dest), transfers.rename_noreplace

    def refused(source, target):
        raise PermissionError(errno.EACCES, "Permission denied")

    mover = transfers.Transfers(dest, move=True)
    monkeypatch.setattr(transfers, "rename_noreplace", refused)
    with pytest.raises(transfers.TransferError, match="Permission denied"):
        mover.transfer(src / "x.png", Path("x.png"))
    mover.close()
    assert contents(src, dest) == before and not hidden_leftovers(dest)
    monkeypatch.setattr(transfers, "rename_noreplace", real_rename)
    mover = transfers.Transfers(dest, move=True)
    assert mover.transfer(src / "x.png", Path("x.png")) == (dest / "x_1.png", True)
    mover.close()
    assert contents(src, dest) == before


def test_a_move_from_another_file_system_flushes_the_copys_folder_before_removing_the_source(tmp_path,
                                                                                            monkeypatch):
    """Two file systems write their changes out independently: a power cut must not find a source's
    removal on disk without its copy's name. Another file system is faked (the source's st_dev)."""
    from citytools import transfers

    src = images(tmp_path / "in", ["a.png", "b.png"])
    dest = tmp_path / "dest"
    real_stat = os.stat

    class Elsewhere:
        def __init__(self, stat):
            self.stat = stat

        def __getattr__(self, name):
            return self.stat.st_dev + 1 if name == "st_dev" else getattr(self.stat, name)

    def stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        return Elsewhere(result) if Path(os.fsdecode(path)).parent == src else result

    flushed = []
    monkeypatch.setattr(transfers.os, "stat", stat)
    monkeypatch.setattr(transfers, "fsync_folder", lambda folder: flushed.append(
        (Path(folder), sorted(p.name for p in src.iterdir()))))
    mover = transfers.Transfers(dest, move=True)
    for name in ("a.png", "b.png"):
        mover.transfer(src / name, Path(name))
    mover.close()
    assert flushed == [(dest, ["a.png", "b.png"]), (dest, ["b.png"])]  # each while its source was still there
    assert sorted(p.name for p in dest.glob("*.png")) == ["a.png", "b.png"] and not list(src.iterdir())


@pytest.mark.parametrize("placing", ["links", "renames"])
def test_names_at_the_file_systems_limit_still_move_and_take_free_names(converted, tmp_path, monkeypatch, placing):
    """NAME_MAX is 255 bytes: a 251-byte name taken in the destination, and the hidden staging name
    (26 bytes longer), are shortened by whole characters (3-byte ones here), not refused."""
    if placing == "renames":
        without_hard_links(monkeypatch)
    long_names = ["\u3042" * 82 + "a.png", "b" * 251 + ".png"]  # 82 * 3 + 1 + 4 = 251 bytes; 255 bytes
    src = images(tmp_path / "in", long_names)
    dest = images(tmp_path / "dest", long_names, seed=50)  # both names taken by other pictures
    out = tmp_path / "r.jsonl"
    before = contents(src, dest)
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--move-to", dest) == 0
    assert contents(src, dest) == before and not list(src.iterdir()) and not hidden_leftovers(dest)
    names = sorted(os.fsencode(p.name) for p in dest.iterdir() if not p.name.startswith("."))
    assert len(names) == 4 and all(len(name) <= 255 for name in names)
    assert sum(name.endswith(b"_1.png") for name in names) == 2
    for name in names:
        name.decode("utf-8")  # cut between characters, not inside one


def test_a_destination_without_hard_links_or_safe_renames_is_refused_before_scoring(converted, tmp_path,
                                                                                   monkeypatch):
    from citytools import transfers

    without_hard_links(monkeypatch)

    def overwriting_rename(source, target):  # a file system that ignores RENAME_NOREPLACE
        os.rename(source, target)

    monkeypatch.setattr(transfers, "rename_noreplace", overwriting_rename)
    src = images(tmp_path / "in", ["a.png", "b.png"])
    before, dest, out = contents(src), tmp_path / "dest", tmp_path / "r.jsonl"
    with pytest.raises(UsageError, match="neither hard links nor renames that refuse to overwrite"):
        run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--move-to", dest)
    assert contents(src) == before and list(dest.iterdir()) == []
    assert not out.exists() or rows_of(out) == []  # refused before anything was scored


def test_a_file_changed_since_it_was_scored_is_not_moved_on_its_old_score(converted, tmp_path, capsys):
    """Scores are of the file as it was decoded: one replaced afterwards (another picture under the
    same name) stays where it is with one error line, exit 1; the others move; nothing is lost."""
    src = images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out, dest = tmp_path / "r.jsonl", tmp_path / "dest"
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0) == 0
    assert all(isinstance(r["file_size"], int) and isinstance(r["modified"], int) for r in rows_of(out))
    make_image(64, 64, seed=77).save(src / "b.png")  # replaced after scoring
    stat = (src / "c.png").stat()  # only touched (a second later: coarse file-system clocks too)
    os.utime(src / "c.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    before = contents(src)
    capsys.readouterr()
    assert run(src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--move-to", dest) == 1
    err = capsys.readouterr().err
    changed = [line for line in err.splitlines() if "changed since it was scored" in line]
    assert len(changed) == 2 and any("b.png" in line for line in changed) and any("c.png" in line for line in changed)
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["a.png"]
    assert sorted(p.name for p in src.iterdir()) == ["b.png", "c.png"]
    assert contents(src, dest) == before  # every content kept, none doubled
    assert len(rows_of(out)) == 3  # resume: nothing scored twice


def test_a_source_that_cannot_be_removed_stays_beside_its_copy_with_one_line(converted, trial, monkeypatch, capsys):
    """A move whose source cannot be unlinked (a read-only folder or mount, an immutable file: faked,
    since the tests run as root) keeps both, says so in one line per file, rerun after rerun, and
    finishes once the source can go."""
    from citytools import transfers

    src, dest, out, before = trial.src, trial.dest, trial.out, trial.before
    stuck = src / "a" / "x.png"
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(transfers.os, "unlink", unlink)
    args = [src, "--model", converted["ca"], "--out", out, "--workers", 0, *EVERY, "--move-to", dest]
    for _ in range(2):  # the first run and a rerun: the same, no traceback
        capsys.readouterr()
        assert run(*args) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(stuck) in errors[0] and "cannot be removed" in errors[0], errors
        assert stuck.exists() and sorted(p.name for p in src.rglob("*.png")) == ["x.png"]
        extra = contents(src, dest) - before  # every content kept; the stuck one once more, nothing else
        assert contents(src, dest) - extra == before and sum(extra.values()) == 1
        assert not hidden_leftovers(dest)
    monkeypatch.setattr(transfers.os, "unlink", real_unlink)
    assert run(*args) == 0
    assert contents(src, dest) == before and not list(src.rglob("*.png"))
