"""classify.py --dataset: webdataset tars and parquet shards written here, read through `datasets`' own
builders as streams; every sample scored once (kills, reruns, torchrun ranks), bad samples and shards as
error rows, network failures retried, the scores a dataset that joins back to its source."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_image, sigkill, start_held

from citytools.toolkit import UsageError

SIZES = [(50, 40), (200, 130), (130, 400), (61, 70), (300, 300), (90, 45), (120, 80), (64, 64), (77, 99)]


def run(*args):
    from citytools.cli import classify

    return classify.main([str(a) for a in args])


def png_bytes(image, fmt="PNG"):
    data = io.BytesIO()
    image.save(data, fmt)
    return data.getvalue()


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def pictures(tmp_path):
    """name -> encoded bytes of 9 pictures, also saved in a folder for the folder route."""
    folder = tmp_path / "folder"
    folder.mkdir()
    out = {}
    for i, size in enumerate(SIZES):
        fmt = "JPEG" if i == 4 else "PNG"
        name = f"pic{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        out[name] = png_bytes(make_image(*size, seed=i), fmt)
        (folder / name).write_bytes(out[name])
    return out


def write_tars(folder, pictures, shards=3, extra=None):
    """webdataset shards as img2dataset writes them (KEY.jpg/png + KEY.json), samples dealt round the
    shards; -> {sample key: picture name}. `extra`: (shard, key, {extension: bytes}) samples added."""
    folder.mkdir(parents=True, exist_ok=True)
    names, keys = sorted(pictures), {}
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i, name in enumerate(names[s::shards]):
                key = f"{s:05d}{i:04d}"
                add_member(tar, f"{key}.{name.rsplit('.', 1)[1]}", pictures[name])
                add_member(tar, f"{key}.json", json.dumps({"name": name}).encode())
                keys[key] = name
            for shard, key, members in extra or []:
                if shard == s:
                    for extension, data in members.items():
                        add_member(tar, f"{key}.{extension}", data)
    return keys


def write_parquet(folder, pictures, shards=3):
    """parquet shards with an `image` {bytes, path} column and an `id`; -> {(file, row): name}."""
    folder.mkdir(parents=True, exist_ok=True)
    names, where = sorted(pictures), {}
    for s in range(shards):
        rows = [{"id": f"id-{name}", "image": {"bytes": pictures[name], "path": name}} for name in names[s::shards]]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        where.update({(f"{s:05d}.parquet", row): name for row, name in enumerate(names[s::shards])})
    return where


def folder_scores(pictures_folder, model, out):
    assert run(pictures_folder, "--model", model, "--out", out, "--dtype", "float32", "--workers", 0) == 0
    return {Path(r["path"]).name: r["ca:Pass"] for r in pq.read_table(out).to_pylist()}


def test_webdataset_and_parquet_streams_score_every_sample_once_as_the_folder_route(converted, pictures, tmp_path,
                                                                                    monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    expected = folder_scores(tmp_path / "folder", converted["ca"], tmp_path / "files.parquet")
    keys = write_tars(tmp_path / "wds", pictures)
    assert run("--dataset", "webdataset", "--data-files", "wds/*.tar", "--streaming", "--out", "w.parquet",
               "--model", converted["ca"], "--dtype", "float32", "--workers", 2) == 0
    rows = pq.read_table(tmp_path / "w.parquet").to_pylist()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)  # each sample once
    for row in rows:
        assert row["key"] == f"{row['__key__'][:5]}.tar/{row['__key__']}" and row["error"] is None
        assert abs(row["ca:Pass"] - expected[keys[row["__key__"]]]) < 1e-6

    where = write_parquet(tmp_path / "pq", pictures)
    assert run("--dataset", "parquet", "--data-files", "pq/*.parquet", "--streaming", "--image-column", "image",
               "--out", "p.parquet", "--model", converted["ca"], "--dtype", "float32", "--workers", 0) == 0
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert sorted((r["shard"], r["row"]) for r in rows) == sorted(where)
    for row in rows:
        assert row["key"] == f"{row['shard']}#{row['row']}"
        assert abs(row["ca:Pass"] - expected[where[row["shard"], row["row"]]]) < 1e-6

    # the output is a dataset that joins back to the source on its key
    scores = datasets.load_dataset("parquet", data_files=str(tmp_path / "w.parquet"), split="train")
    meta = json.loads(pq.read_schema(tmp_path / "w.parquet").metadata[b"cityclassifier"])
    assert meta["source"]["dataset"] == "webdataset" and meta["models"][0]["key"] == "ca"
    score = dict(zip(scores["__key__"], scores["ca:Pass"]))
    source = datasets.load_dataset("webdataset", data_files="wds/*.tar", split="train", streaming=True)
    joined = [(sample["json"]["name"], score[sample["__key__"]]) for sample in source]
    assert len(joined) == len(pictures) and all(abs(s - expected[name]) < 1e-6 for name, s in joined)


def test_id_column_keys_the_rows(converted, pictures, tmp_path):
    write_parquet(tmp_path / "pq", pictures)
    assert run("--dataset", "parquet", "--data-files", tmp_path / "pq/*.parquet", "--id-column", "id", "--out",
               tmp_path / "i.jsonl", "--model", converted["ca"], "--workers", 0) == 0
    rows = [json.loads(line) for line in (tmp_path / "i.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"id-{name}" for name in pictures)
    assert all(r["key"] == r["id"] and set(r) >= {"width", "height", "ca:Pass"} for r in rows)


def test_image_folder_dataset_keys_by_file(converted, pictures, tmp_path):
    expected = folder_scores(tmp_path / "folder", converted["ca"], tmp_path / "files.parquet")
    (tmp_path / "folder" / "broken.png").write_bytes(b"not a png")
    assert run("--dataset", tmp_path / "folder", "--out", tmp_path / "d.jsonl", "--model", converted["ca"],
               "--dtype", "float32", "--workers", 0) == 1
    rows = {json.loads(line)["shard"]: json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()}
    assert set(rows) == set(expected) | {"broken.png"}
    assert rows["broken.png"]["error"] == "not an image (unrecognised format)"
    assert all(abs(rows[name]["ca:Pass"] - score) < 1e-6 for name, score in expected.items())


def test_bad_samples_and_unreadable_shards_are_error_rows(converted, pictures, tmp_path):
    keys = write_tars(tmp_path / "wds", pictures, shards=3, extra=[
        (0, "corrupt", {"png": b"\x89PNG\r\n\x1a\n" + b"x" * 200, "json": b"{}"}),
        (2, "noimage", {"json": b"{}"})])
    good = tmp_path / "wds" / "00001.tar"
    good.write_bytes(good.read_bytes()[:2000])  # cut inside its first picture: nothing of it can be read
    (tmp_path / "wds" / "00003.tar").write_bytes(os.urandom(3000))  # not a tar at all
    out = tmp_path / "bad.jsonl"
    args = ["--dataset", "webdataset", "--data-files", tmp_path / "wds/*.tar", "--out", out, "--model",
            converted["ca"], "--workers", 0]
    assert run(*args) == 1
    rows = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    lost = {k for k in keys if k.startswith("00001")}
    assert set(rows) == {f"{k[:5]}.tar/{k}" for k in set(keys) - lost} | {
        "00000.tar/corrupt", "00002.tar/noimage", "00001.tar#unreadable", "00003.tar#unreadable"}
    assert rows["00000.tar/corrupt"]["error"].startswith("cannot decode")
    assert rows["00002.tar/noimage"]["error"] == "no image in this sample"
    for shard in ("00001", "00003"):
        row = rows[f"{shard}.tar#unreadable"]
        assert row["error"].startswith("this shard cannot be read after 0 sample(s)") and "ReadError" in row["error"]
        assert row["__url__"].endswith(f"{shard}.tar") and row.get("ca:Pass") is None
    assert sum(r["error"] is None for r in rows.values()) == len(keys) - len(lost)
    assert run(*args) == 1  # a rerun: the same failures, nothing written twice
    assert len(out.read_text().splitlines()) == len(rows)


def test_network_failures_are_retried_then_end_the_run_resumably(converted, pictures, tmp_path, monkeypatch, capsys):
    from citytools import streaming

    keys = write_tars(tmp_path / "wds", pictures)
    out = tmp_path / "n.jsonl"
    args = ["--dataset", "webdataset", "--data-files", tmp_path / "wds/*.tar", "--out", out, "--model",
            converted["ca"], "--workers", 0, "--batch-size", 1]
    monkeypatch.setenv("CITYCLASSIFIER_RETRY_SECONDS", "0")
    monkeypatch.setenv("CITYCLASSIFIER_STREAM_FAIL", "00001.tar:1:2")  # drops twice, then reads
    monkeypatch.setattr(streaming.iter_with_fault_injection, "failures", 0)
    assert run(*args) == 0
    assert sorted(json.loads(line)["__key__"] for line in out.read_text().splitlines()) == sorted(keys)

    out.unlink()
    monkeypatch.setenv("CITYCLASSIFIER_STREAM_FAIL", f"00001.tar:1:{streaming.RETRIES}")  # never comes back
    monkeypatch.setattr(streaming.iter_with_fault_injection, "failures", 0)
    with pytest.raises(UsageError, match=r"00001.tar: cannot be read after 5 tries \(ConnectionError: injected"):
        run(*args)
    kept = [json.loads(line)["__key__"] for line in out.read_text().splitlines()]
    assert "000010000" in kept and "000010001" not in kept  # what was read before is scored and kept
    monkeypatch.delenv("CITYCLASSIFIER_STREAM_FAIL")
    assert run(*args) == 0
    assert sorted(json.loads(line)["__key__"] for line in out.read_text().splitlines()) == sorted(keys)


def test_sigkill_mid_stream_then_rerun_gives_every_key_once_with_the_same_scores(converted, pictures, tmp_path):
    keys = write_tars(tmp_path / "wds", pictures)
    base = [sys.executable, str(REPO / "classify.py"), "--dataset", "webdataset", "--data-files",
            str(tmp_path / "wds/*.tar"), "--streaming", "--model", str(converted["ca"]), "--dtype", "float32",
            "--batch-size", "2", "--workers", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole = subprocess.run(base + ["--out", str(tmp_path / "whole.parquet")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "k.parquet"
    process = start_held(base + ["--out", str(out)], env, 4, tmp_path / "held")
    workers = sigkill(process, freeze_children=True)
    try:
        journal = tmp_path / ".k.parquet.jsonl"
        assert 4 <= len(journal.read_text().splitlines()) < len(keys)
        rerun = subprocess.run(base + ["--out", str(out)], env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    finally:
        for pid in workers:
            os.kill(pid, 9)
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    reference = {r["key"]: r["ca:Pass"] for r in pq.read_table(tmp_path / "whole.parquet").to_pylist()}
    assert all(abs(reference[r["key"]] - r["ca:Pass"]) < 1e-6 for r in rows)


def test_two_torchrun_ranks_give_the_union_once(converted, pictures, tmp_path):
    keys = write_tars(tmp_path / "wds", pictures, shards=3)  # 3 files, 2 ranks: split_dataset_by_node keeps every 2nd
    out = tmp_path / "two.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", str(REPO / "classify.py"), "--dataset", "webdataset", "--data-files",
                           str(tmp_path / "wds/*.tar"), "--streaming", "--model", str(converted["ca"]), "--out",
                           str(out), "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(keys)} scored, 0 failed" in done.stderr  # summed over the ranks: each sample scored by one
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    assert not list(tmp_path.glob(".two*part*"))


def test_push_to_hub_uploads_scores_and_a_card(converted, pictures, tmp_path):
    import datasets

    from citytools.hub_scores import push_scores

    write_tars(tmp_path / "wds", pictures)
    out = tmp_path / "s.parquet"
    assert run("--dataset", "webdataset", "--data-files", tmp_path / "wds/*.tar", "--out", out, "--model",
               converted["ca"], "--workers", 0) == 0
    metadata = json.loads(pq.read_schema(out).metadata[b"cityclassifier"])

    class Hub:  # what push_scores asks of huggingface_hub.HfApi, recorded
        calls = []

        def create_repo(self, repo, **kwargs):
            self.calls.append(("create_repo", repo, kwargs))

        def list_repo_files(self, repo, **kwargs):
            return ["README.md", "data/test-00000-of-00001.parquet"]

        def create_commit(self, repo, operations, **kwargs):
            self.calls.append(("commit", repo, {op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                                                for op in operations}))

    push_scores(out, "me/scores", metadata, private=True, api=Hub())
    (_, repo, options), (_, _, files) = Hub.calls
    assert repo == "me/scores" and options == {"repo_type": "dataset", "private": True, "exist_ok": True}
    card = files["README.md"].decode()
    assert "path: data/train-*.parquet" in card and "path: data/test-*.parquet" in card  # the split already there
    assert 'sample["__key__"] in kept' in card and str(tmp_path) not in card  # no local path leaks
    (tmp_path / "up.parquet").write_bytes(files["data/train-00000-of-00001.parquet"])
    assert len(datasets.load_dataset("parquet", data_files=str(tmp_path / "up.parquet"), split="train")) == 9

    class Offline(Hub):
        def create_repo(self, repo, **kwargs):
            raise ConnectionError("no network")

    with pytest.raises(UsageError, match="cannot upload .*ConnectionError: no network.*the scores are in"):
        push_scores(out, "me/scores", metadata, api=Offline())


@pytest.mark.parametrize("argv, words", [
    (["p", "--data-files", "x/*.tar"], "--data-files goes with --dataset"),
    (["--dataset", "webdataset", "--data-files", "x/*.tar", "--push-to-hub", "me/x", "--out", "s.jsonl"],
     "--push-to-hub uploads a .parquet --out"),
    (["--dataset", "parquet", "--fast-decode"], "--fast-decode decodes files"),
])
def test_dataset_arguments_refused_at_once(argv, words, capsys):
    from citytools.cli.classify_args import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert words in capsys.readouterr().err


def test_a_missing_column_or_dataset_is_one_line(converted, pictures, tmp_path):
    write_parquet(tmp_path / "pq", pictures)
    with pytest.raises(UsageError, match=r"no column 'img' \(has id, image\)"):
        run("--dataset", "parquet", "--data-files", tmp_path / "pq/*.parquet", "--image-column", "img", "--out",
            tmp_path / "x.jsonl", "--model", converted["ca"])
    with pytest.raises(UsageError, match="cannot open the dataset"):
        run("--dataset", "webdataset", "--data-files", tmp_path / "none/*.tar", "--out", tmp_path / "y.jsonl",
            "--model", converted["ca"])


def test_a_decoding_worker_killed_on_a_sample_costs_that_sample_one_error_row(converted, pictures, tmp_path):
    """The kernel's out-of-memory killer, played by the worker itself on one sample: that sample gets
    an error row naming the death, the loader restarts without the samples written, each key once."""
    keys = write_tars(tmp_path / "wds", pictures)
    victim = sorted(keys)[4]
    out = tmp_path / "d.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "classify.py"), "--dataset", "webdataset", "--data-files",
                           str(tmp_path / "wds/*.tar"), "--model", str(converted["ca"]), "--out", str(out),
                           "--workers", "2", "--batch-size", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "CITYCLASSIFIER_KILL_WORKER_ON": victim})
    assert done.returncode == 1, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    errors = {r["__key__"]: r["error"] for r in rows if r["error"]}
    assert list(errors) == [victim] and "died" in errors[victim]


def test_a_hub_layout_dataset_folder_streams_and_its_card_counts_the_samples(converted, pictures, tmp_path):
    """A dataset laid out as the Hub lays parquet datasets out (a card with configs and splits, data/*.parquet),
    given as a folder: read through its card's config, keyed by data file and row, counted for the progress bar."""
    from citytools.streaming import DatasetSource

    where = write_parquet(tmp_path / "repo" / "data", pictures)
    (tmp_path / "repo" / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: id\n    dtype: string\n  - name: image\n    dtype: image\n"
        f"  splits:\n  - name: train\n    num_bytes: 1\n    num_examples: {len(pictures)}\n"
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n")
    assert DatasetSource(str(tmp_path / "repo")).count == len(pictures)
    out = tmp_path / "h.jsonl"
    assert run("--dataset", tmp_path / "repo", "--out", out, "--model", converted["ca"], "--workers", 0) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["shard"], r["row"]) for r in rows) == sorted(where)


def test_an_id_column_with_repeats_scores_each_id_once_and_says_so(converted, pictures, tmp_path, capsys):
    names = sorted(pictures)
    rows = [{"id": f"id-{i % 3}", "image": {"bytes": pictures[name], "path": name}} for i, name in enumerate(names)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "00000.parquet")
    out = tmp_path / "r.jsonl"
    assert run("--dataset", "parquet", "--data-files", tmp_path / "pq/*.parquet", "--id-column", "id", "--out", out,
               "--model", converted["ca"], "--workers", 0) == 0
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["id-0", "id-1", "id-2"]
    assert f"note: {len(names) - 3} sample(s) had a key already seen in this run" in capsys.readouterr().err


def test_a_source_pickles_as_what_it_was_opened_with_not_its_opened_stream(pictures, tmp_path):
    """`datasets` hashes `samples`' generator arguments (the source among them) with dill: objects reachable
    from the opened stream need not pickle. With transformers 5.17 one did not, and the webdataset route
    failed on a GPU machine; here the stream is given an attribute no pickler takes (a generator)."""
    import pickle

    from datasets.fingerprint import Hasher

    from citytools.streaming import DatasetSource

    write_tars(tmp_path / "wds", pictures)
    source = DatasetSource("webdataset", data_files=[str(p) for p in sorted((tmp_path / "wds").glob("*.tar"))])
    source.stream.unpicklable = (n for n in range(3))
    Hasher.hash({"shards": list(enumerate(source.shards)), "source": [source] * len(source.shards)})
    again = pickle.loads(pickle.dumps(source))
    assert (again.shards, again.image_columns, again.webdataset) == (source.shards, source.image_columns, True)
    assert len(list(source.samples())) == len(pictures)
