"""Builds a Hub release folder for a model and uploads it as a tagged version.

  python release.py --model . --repo-id you/cityclassifier-ca --tag v0.1 --metrics bench/synthetic-test/metrics.json \
      --out dist/ca --dry-run
  python release.py --model models/ca-v1.16 --repo-id you/CCAnime-ChromaticAberration --tag v1.16 --out dist/v1.16

The folder holds the remote code, the weights (safetensors only), the configs, and a model card
with YAML metadata (license, tags, pipeline_tag, base model, datasets, and `model-index` results from
a benchmark.py metrics.json) and usage snippets. Uploading creates the repo if needed, refuses a tag
that already exists, uploads the folder in one commit and tags that commit. The token comes from
the HF_TOKEN environment variable or `huggingface-cli login`, never from the command line.
--dry-run writes the folder and prints the calls it would make, without contacting the Hub.
"""

import argparse
import json
import shutil
from pathlib import Path

from citytools.cards import card_text, check_summary_is_of, read_summary
from citytools.toolkit import (
    REMOTE_CODE_FILES,
    ROOT,
    UsageError,
    atomic_output_dir,
    check_hub,
    check_output_dir,
    weights_fingerprint,
)

MODEL_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder (the repo root is the shipped one)")
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME on the Hub")
    parser.add_argument("--tag", help="version tag to create, e.g. v1.16 (refused if it exists)")
    parser.add_argument("--metrics", type=Path, help="benchmark.py metrics.json to publish as model-index")
    parser.add_argument("--out", type=Path, required=True, help="release folder to write")
    parser.add_argument("--license", default="mit", help="licence id for the card (default: mit)")
    parser.add_argument("--dry-run", action="store_true", help="write the folder, print the Hub calls, upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a release folder this tool "
                        "wrote (nothing else in it, and not the model folder)")
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1:
        parser.error(f"--repo-id {args.repo_id!r}: expected OWNER/NAME")
    return args


def build(args):
    """Writes the release folder; returns the parsed model config."""
    missing = [name for name in MODEL_FILES if not (args.model / name).is_file()]
    if missing:
        raise UsageError(f"{args.model}: not a model folder (missing {', '.join(missing)})")
    pickles = sorted(p.name for p in args.model.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    config = json.loads((args.model / "config.json").read_text())
    if config.get("model_type") != "cityclassifier":
        raise UsageError(f"{args.model / 'config.json'}: model_type is {config.get('model_type')!r}, "
                         "not cityclassifier")
    summary = None
    if args.metrics:  # the figures of this model's weights, or none
        summary = read_summary(args.metrics)
        check_summary_is_of(summary, args.metrics, weights_fingerprint(args.model))
    with atomic_output_dir(args.out, args.overwrite, inputs=(args.model,)) as tmp:
        for name in MODEL_FILES:
            shutil.copy2(args.model / name, tmp / name)
        for name in REMOTE_CODE_FILES:  # the repo's code: the version these tools were tested with
            shutil.copy2(ROOT / name, tmp / name)
        (tmp / "README.md").write_text(card_text(config, args.repo_id, args.license, summary))
    if pickles:
        print(f"left out pickled files (weights ship as safetensors only): {', '.join(pickles)}")
    return config


def upload(args, api=None):
    """Creates the repo, refuses an existing tag, uploads the folder and tags the commit."""
    from huggingface_hub import HfApi

    calls = [("create_repo", {"repo_id": args.repo_id, "repo_type": "model", "exist_ok": True})]
    if args.tag:
        calls.append(("list_repo_refs", {"repo_id": args.repo_id}))
    calls.append(("upload_folder", {"repo_id": args.repo_id, "folder_path": str(args.out),
                                    "commit_message": f"Release {args.tag or ''}".strip()}))
    if args.tag:
        calls.append(("create_tag", {"repo_id": args.repo_id, "tag": args.tag, "revision": "<the upload's commit>"}))
    if args.dry_run:
        for name, kwargs in calls:
            print(f"would call HfApi().{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        return None
    api = api or HfApi()  # the token: HF_TOKEN or the saved login
    api.create_repo(repo_id=args.repo_id, repo_type="model", exist_ok=True)
    if args.tag:
        existing = {ref.name for ref in api.list_repo_refs(repo_id=args.repo_id).tags}
        if args.tag in existing:
            raise UsageError(f"{args.repo_id}: tag {args.tag!r} exists already; releases are never overwritten")
    commit = api.upload_folder(repo_id=args.repo_id, folder_path=str(args.out),
                               commit_message=f"Release {args.tag or ''}".strip())
    if args.tag:
        api.create_tag(repo_id=args.repo_id, tag=args.tag, revision=commit.oid)
    print(f"uploaded {args.out} to {args.repo_id}" + (f" as {args.tag}" if args.tag else ""))
    return commit


def main(argv=None, api=None):
    """`api`: an HfApi stand-in (tests); without one a real upload first checks that the Hub answers
    with a token, before the release folder is written."""
    args = parse_args(argv)
    check_output_dir(args.out, args.overwrite, inputs=(args.model,))
    if not args.dry_run and api is None:
        check_hub("release.py upload (use --dry-run to only write the folder)")
    build(args)
    print(f"wrote {args.out}")
    upload(args, api)
    return 0
