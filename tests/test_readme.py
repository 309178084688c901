"""The README is the first screen and the model card: its commands run as written, it stays short, and
every link of it and of docs/ leads somewhere, so the manual cannot rot."""

import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def section(title):
    """The text of the README's `## title` section."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_a_first_screen_that_links_every_docs_page():
    text = README.read_text()
    assert len(text.encode()) < 12_000, len(text.encode())
    assert text.startswith("---\n") and "\npipeline_tag: image-classification\n" in text  # still the model card
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, page.name


def test_every_link_in_the_readme_and_docs_leads_somewhere():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"(?m)^#+ (.*)$", file.read_text())
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_pipeline_snippet_runs_as_written():
    (snippet,) = code_blocks(section("Use the model"), "python")
    script = snippet + "\nresult = pipe('examples/aberration_shift.png', top_k=None)\nprint(repr(result))\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess's repr of a list
    assert [r["label"] for r in result] == ["Chromatic Aberration", "Pass"], result


def test_the_readme_classify_commands_run_as_written(converted, tmp_path):
    """The three commands, with /data/ a folder of the bundled examples and models/ the test's tiny
    converted originals: each exits 0 and does what the README says."""
    (block,) = code_blocks(section("Score and filter whole collections"), "bash")
    data = tmp_path / "data"
    shutil.copytree(REPO / "examples", data / "images")
    for name, key in (("ca-v1.16", "ca"), ("compression-v1.5", "compression")):
        shutil.copytree(converted[key], tmp_path / "models" / name)
    (tmp_path / "files.txt").write_text("\n".join(str(p) for p in sorted((REPO / "examples").iterdir())) + "\n")
    commands = [line.split("#")[0] for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) == 3
    for command in commands:
        argv = [a.replace("/data/", f"{data}/") for a in shlex.split(command)]
        assert argv[:2] == ["python", "classify.py"], argv
        done = subprocess.run([sys.executable, str(REPO / "classify.py"), *argv[2:]], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, (command, done.stderr[-2000:])
    rejected = sorted(p.name for p in (data / "rejected").rglob("*.png"))
    assert rejected == sorted(p.name for p in (REPO / "examples").glob("aberration_*.png")), rejected
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "scores.parquet")
    assert table.num_rows == 8 and {"ca-v1.16:Pass", "compression-v1.5:JPEG"} <= set(table.column_names)
    assert (tmp_path / "results.jsonl").is_file()


def test_the_readme_hub_scale_commands_and_recipe_run_as_written(tmp_path):
    """The two commands on webdataset tars and parquet shards of the bundled examples, with the shipped
    model, then the join-filter recipe (its push replaced by a listing): what it keeps is exactly the
    samples scored below 0.5."""
    import json

    import pyarrow.parquet as pq
    from test_streaming import write_parquet, write_tars

    text = section("Hub-scale datasets")
    (block,) = code_blocks(text, "bash")
    (recipe,) = code_blocks(text, "python")
    pictures = {p.name: p.read_bytes() for p in sorted((REPO / "examples").iterdir())}
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    places = []
    for argv, make in zip(commands, (lambda d: write_tars(d / "shards", pictures, shards=2),
                                     lambda d: write_parquet(d / "data", pictures, shards=2))):
        place = tmp_path / argv[3]
        place.mkdir()
        make(place)
        assert argv[:2] == ["python", "classify.py"], argv
        done = subprocess.run([sys.executable, str(REPO / "classify.py"), *argv[2:]], cwd=place, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert pq.read_table(place / "scores.parquet").num_rows == len(pictures)
        places.append(place)
    assert recipe.rstrip().endswith('clean.push_to_hub("you/pictures-clean")')
    listing = 'print(json.dumps([s["__key__"] for s in clean]))'
    script = recipe.replace('clean.push_to_hub("you/pictures-clean")', listing)
    done = subprocess.run([sys.executable, "-c", "import json\n" + script], cwd=places[0], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = pq.read_table(places[0] / "scores.parquet").to_pylist()
    below = sorted(r["__key__"] for r in rows if r["default:Chromatic Aberration"] < 0.5)
    assert sorted(json.loads(done.stdout.strip().splitlines()[-1])) == below and 0 < len(below) < len(rows)
