#!/usr/bin/env python
"""Head-only training's step rate at batch 1 (the original's recipe: frozen backbone, cached
embeddings, AdamW, one image a step), three ways on one model in one run:
- `Trainer` as it comes: it walks the whole model (backbone included) on every step;
- train_hf.py's `HeadOnlyTrainer`, which sets the frozen backbone aside while it trains;
- the head alone in a plain PyTorch loop (fused AdamW, no Trainer): the floor.
Rounds alternate the three and the best round counts (shared machines are noisy). It prints a
table and writes JSON, with the CPU's or GPU's name.

The backbone is random and sized as ViT-L/14-336 (or tiny, to see Trainer's cost without it); the
head is the original's (768 -> 1024), or 16 wide (--head tiny): then a CPU step is mostly fixed
cost, as a GPU step is. On a GPU, Trainer runs with fp16 as the recipe does.

  python bench/bench_head_steps.py --out bench/head-steps.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_classify import VIT_L, machine  # noqa: E402
from gpu_measures import sync  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 30, "patch_size": 6, "projection_dim": 16}


def random_model(backbone, head_hidden_size=1024, projection_dim=768):
    """A random CityClassifier with a ViT-L-sized ("vit-l") or tiny ("tiny") frozen backbone."""
    from transformers import CLIPVisionConfig

    from citytools.remote import CityClassifierConfig, CityClassifierForImageClassification

    vision = CLIPVisionConfig(**{**(VIT_L if backbone == "vit-l" else TINY), "projection_dim": projection_dim})
    torch.manual_seed(0)
    model = CityClassifierForImageClassification(
        CityClassifierConfig(vision_config=vision, head_hidden_size=head_hidden_size, label_loss_weights=[1.0, 0.5]))
    for module in model.backbone_modules():
        module.requires_grad_(False)
    return model


class Embeddings(torch.utils.data.Dataset):
    """Cached-embedding rows, as citytools.embedding.EmbeddedViews gives them: one (dim,) embedding and a label."""

    def __init__(self, rows, dim):
        generator = torch.Generator().manual_seed(0)
        self.embeds = torch.randn(rows, dim, generator=generator)

    def __len__(self):
        return len(self.embeds)

    def __getitem__(self, index):
        return {"image_embeds": self.embeds[index], "labels": index % 2}


def trainer_steps_per_s(trainer_class, model, device, steps, warmup, output_dir):
    """Steps/s of `trainer_class` training `model`'s head at batch 1, timed from step `warmup` to the last."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from citytools import training_data

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                sync(device)
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=1, learning_rate=1.5e-6,
        lr_scheduler_type="cosine", eval_strategy="no", save_strategy="no", logging_steps=steps, report_to="none",
        remove_unused_columns=False, disable_tqdm=True, seed=0, use_cpu=device.type != "cuda",
        fp16=device.type == "cuda", dataloader_pin_memory=device.type == "cuda")
    rows = Embeddings(max(steps, 64), model.head.up[0].in_features)
    trainer = trainer_class(model=model, args=args, train_dataset=rows, data_collator=training_data.collate,
                            callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log line instead
    trainer.train()
    return (steps - warmup) / (marks[steps] - marks[warmup])


def plain_loop_steps_per_s(head, device, steps, warmup):
    """Steps/s of the head alone in a plain loop: batch 1, fused AdamW, weighted cross-entropy, float32."""
    head = head.to(device).train()
    inputs = torch.randn(steps, 1, head.up[0].in_features, device=device)
    labels = torch.randint(0, 2, (steps, 1), device=device)
    weights = torch.tensor([1.0, 0.5], device=device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1.5e-6, fused=True)  # as Trainer's adamw_torch_fused

    def step(i):
        torch.nn.functional.cross_entropy(head(inputs[i]), labels[i], weight=weights).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, steps):
        step(i)
    sync(device)
    return (steps - warmup) / (time.perf_counter() - start)


def measure(model, device, steps, rounds, output_dir):
    """{trainer, head_only_trainer, plain_loop: best steps/s over `rounds` alternating rounds, and ratios}."""
    import copy

    from transformers import Trainer

    from citytools.training import HeadOnlyTrainer

    warmup = min(50, steps // 5)
    head = copy.deepcopy(model.head)
    best = {"trainer": 0.0, "head_only_trainer": 0.0, "plain_loop": 0.0}
    for _ in range(rounds):
        best["trainer"] = max(best["trainer"], trainer_steps_per_s(Trainer, model, device, steps, warmup, output_dir))
        best["head_only_trainer"] = max(best["head_only_trainer"], trainer_steps_per_s(
            HeadOnlyTrainer, model, device, steps, warmup, output_dir))
        best["plain_loop"] = max(best["plain_loop"], plain_loop_steps_per_s(head, device, steps, warmup))
    return {**best, "steps": steps, "rounds": rounds,
            "head_only_trainer_vs_trainer": best["head_only_trainer"] / best["trainer"],
            "head_only_trainer_share_of_plain_loop": best["head_only_trainer"] / best["plain_loop"],
            "recipe_30k_steps_s": 30000 / best["head_only_trainer"]}


def main(argv=None):
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "head-steps.local.json", help="JSON to write")
    parser.add_argument("--steps", type=int, default=1000, help="steps per measurement (default: 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, best counts (default: 3)")
    parser.add_argument("--backbone", choices=["vit-l", "tiny"], default="vit-l",
                        help="the frozen backbone's size (default: vit-l)")
    parser.add_argument("--head", choices=["original", "tiny"], default="original",
                        help="the head: the original's, 768 -> 1024 wide, or 16 -> 16 (default: original)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = random_model(args.backbone, *((1024, 768) if args.head == "original" else (16, 16)))
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(model, device, args.steps, args.rounds, Path(tmp))
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu": machine(),
              "torch": torch.__version__, "backbone": args.backbone, "head": args.head,
              "backbone_parameters": sum(p.numel() for m in model.backbone_modules() for p in m.parameters()),
              **figures}
    print(f"{report['device']} ({report['cpu']['processor']}), batch-1 steps of the {args.head} head, "
          f"{args.backbone} backbone (best of {args.rounds}):")
    for key in ("trainer", "head_only_trainer", "plain_loop"):
        print(f"  {key:18s} {report[key]:8.1f} steps/s  {1000 / report[key]:6.2f} ms a step")
    print(f"  HeadOnlyTrainer against Trainer: {report['head_only_trainer_vs_trainer']:.2f}x; "
          f"30K steps in {report['recipe_30k_steps_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
