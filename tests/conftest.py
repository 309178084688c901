"""Fixtures: a tiny random CLIP, original-format heads, and converted model folders, made once per session."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLIP_SIZE = 30  # the tiny CLIP's input: tiles are 60 px, tiling starts above 60 px


def run_script_watching_imports(script, args):
    """Runs a tool of the repo as `python script args` would, in a fresh Python, up to its exit.
    -> (exit status, whether torch was imported, whether transformers was, stdout, stderr)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, *{list(args)!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    print('\\nexit', exit.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    last = done.stdout.splitlines()[-1].split() if done.stdout.strip() else []
    assert last[:1] == ["exit"], done.stderr[-2000:]
    return int(last[1]), last[2] == "True", last[3] == "True", done.stdout, done.stderr


def make_tiny_clip(folder):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=CLIP_SIZE, patch_size=6, projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
    ).save_pretrained(folder)
    return folder


def original_head_state(features, hidden, outputs, seed):
    """A random head under the released files' key names, scaled so that outputs are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "up.0": (hidden, features), "up.1.long.0": (hidden, hidden), "up.1.long.2": (hidden, hidden),
        "up.1.long.4": (hidden, hidden), "down.0": (128, hidden), "down.1": (64, 128),
        "down.4": (32, 64), "down.5": (outputs, 32),
    }
    state = {}
    for name, (n_out, n_in) in shapes.items():
        state[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) * (2.0 / n_in) ** 0.5
        state[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def write_release(folder, stem, state, config=None):
    head = Path(folder) / f"{stem}.safetensors"
    save_file(state, str(head))
    if config is not None:
        (Path(folder) / f"{stem}.config.json").write_text(json.dumps(config))
    return head


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def releases(tmp_path_factory):
    """Original-format releases: a 2-class CA head, a 3-class compression head, a score head."""
    folder = tmp_path_factory.mktemp("releases")
    ca = write_release(folder, "CCAnime-ChromaticAberration-v1.16", original_head_state(16, 64, 2, 1), {
        "name": "CCAnime-ChromaticAberration", "rev": "v1.16", "arch": "class",
        "labels": {"0": "Pass", "1": "Chromatic Aberration"},
        "model_params": {"features": 16, "hidden": 64, "outputs": 2}})
    comp = write_release(folder, "CCAnime-Compression-v1.5", original_head_state(16, 64, 3, 2), {
        "name": "CCAnime-Compression", "rev": "v1.5", "arch": "class",
        "labels": {"0": "Pass", "1": "JPEG", "2": "WEBP"},
        "model_params": {"features": 16, "hidden": 64, "outputs": 3}})
    score = write_release(folder, "CityAesthetics-Anime-v1.8", original_head_state(16, 64, 1, 3), {
        "name": "CityAesthetics-Anime", "rev": "v1.8", "arch": "score",
        "model_params": {"features": 16, "hidden": 64, "outputs": 1}})
    return {"ca": ca, "compression": comp, "score": score}


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_clip, releases):
    """The three releases converted with convert_original.py (in-process), keyed like `releases`."""
    from citytools.cli import convert_original

    out = {}
    for key, head in releases.items():
        folder = tmp_path_factory.mktemp("converted") / key
        assert convert_original.main(["--head", str(head), "--clip", str(tiny_clip), "--out", str(folder)]) == 0
        out[key] = folder
    return out


def make_image(width, height, seed=0, mode="RGB"):
    """A deterministic image with smooth gradients and sharp noise, so resizes and crops matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1), y / max(height, 1), (x + y) / max(width + height, 1)], -1) * 200
    pixels = np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def write_benchmark_split(split, count=8, size=(90, 80), step=10, family=None):
    """A labelled split folder for benchmark.py: `count` images of growing width, odd ones shifted by
    3 px (`1_shift/`), even ones clean (`0_clean/`), and a metadata.csv with effect and strength (and
    family, width and height when `family(i)` names each image's family)."""
    from citytools.cli import make_synthetic_data as m

    rng = np.random.default_rng(0)
    header = "file_name,effect,strength" + (",family,width,height" if family else "")
    rows = [header]
    for i in range(count):
        image = make_image(size[0] + step * i, size[1], seed=i)
        effect, strength = ("shift", 3.0) if i % 2 else ("clean", 0.0)
        if effect == "shift":
            image = m.channel_shift(image, rng, strength)
        folder = f"{i % 2}_{effect}"
        (split / folder).mkdir(parents=True, exist_ok=True)
        image.save(split / folder / f"{i}.png")
        extra = f",{family(i)},{image.width},{image.height}" if family else ""
        rows.append(f"{folder}/{i}.png,{effect},{strength}{extra}")
    (split / "metadata.csv").write_text("\n".join(rows) + "\n")


def children_of(pid):
    """The pids of a process's living children, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def start_held(command, env, rows, marker, deadline_s=300):
    """Starts a classify.py command that stops after writing `rows` rows (citytools.loading.hold_for_kill) and
    returns its process once it is held there, so a test kills it at a point the test chose, not at
    whatever point a timer hits. Fails if the command ends first (a refusal, or it finished)."""
    marker = Path(marker)
    marker.unlink(missing_ok=True)
    process = subprocess.Popen(command, env={**env, "CITYCLASSIFIER_HOLD_AFTER_ROWS": f"{rows}:{marker}"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + deadline_s  # a safety net against a hang, not a speed assumption
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"ended with {process.returncode} before it was held: {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "never reached the hold point"
        time.sleep(0.02)
    return process


def sigkill(process, freeze_children=False):
    """SIGKILLs a process held by `start_held`, and only it: its children (decoding workers) live on,
    stopped with SIGSTOP when `freeze_children`, so they cannot exit before the next step of the test.
    Asserts that the kill is what ended it. -> the frozen children's pids (SIGKILL them afterwards)."""
    frozen = children_of(process.pid) if freeze_children else []
    for child in frozen:
        os.kill(child, signal.SIGSTOP)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL, process.returncode
    return frozen
