"""What train_hf.py adds to Trainer: the head-only trainer that sets the frozen backbone aside, the
distilling trainer that also learns frozen teachers' scores, the loss history and plots, metrics,
the "find the mislabelled image" list, and resuming only from a complete checkpoint."""

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from citytools.toolkit import ROOT, UsageError, first_line
from citytools.training_data import IMAGE, collate, inference_transform

logger = logging.getLogger("train_hf")


class HeadOnlyTrainer(Trainer):
    """Trainer for head-only training: while it trains, the frozen backbone (the stem and the CLIP
    tower) is set aside out of the model's module tree, and put back whenever weights are saved, so
    every checkpoint and the final model are whole. A checkpoint loaded meanwhile (a resumed run,
    the best model at the end) loads into the head: torch skips the keys of a submodule set to None,
    and the backbone is frozen, the very weights the checkpoint holds.

    Trainer walks the whole model on every step (`model.train()`, `zero_grad()`, the gradient norm
    over `parameters()`): with a ViT-L backbone that walk is most of a batch-1 head step, which is
    all fixed cost (bench/bench_head_steps.py measures both ways). Under DeepSpeed, FSDP or
    torch.compile, which take their own copies of the weights, nothing is set aside."""

    _aside = {}  # backbone modules by attribute name, while set aside

    def train(self, *args, **kwargs):
        model = self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.torch_compile:
            return super().train(*args, **kwargs)
        asked = [name for name in ("gradient_checkpointing", "activation_checkpointing") if getattr(self.args, name, 0)]
        if asked:  # it would look for checkpointed layers in the head alone, and fail
            logger.info("head-only training: --%s left off (the backbone does not run while the head trains)", asked[0])
            for name in asked:
                setattr(self.args, name, False)
        backbone = [id(module) for module in model.backbone_modules()]
        self._aside = {name: module for name, module in model.named_children() if id(module) in backbone}
        model._modules.update(dict.fromkeys(self._aside))
        try:
            return super().train(*args, **kwargs)
        finally:
            model._modules.update(self._aside)
            self._aside = {}

    def _save(self, *args, **kwargs):
        self.model._modules.update(self._aside)
        try:
            return super()._save(*args, **kwargs)
        finally:
            self.model._modules.update(dict.fromkeys(self._aside))


class DistillingTrainer(Trainer):
    """Trainer whose training loss adds the cross-entropy of the model's combined scores against the
    scores of frozen teachers on the same inputs (knowledge distillation; train_hf.py --distill_from).
    The target is the teachers' weighted geometric mean, softmax(sum_i w_i log p_i): for two labels,
    the weighted sum of their calibrated log-odds. It teaches one model what an ensemble of models
    scores, without the ensemble's cost when it classifies. Evaluation losses are the labels' only."""

    def __init__(self, *args, teachers=(), teacher_weights=(), distill_loss_weight=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if len(teachers) != len(teacher_weights):
            raise ValueError(f"{len(teachers)} teachers, {len(teacher_weights)} weights")
        self.teachers = [teacher.eval().requires_grad_(False) for teacher in teachers]
        self.teacher_weights = list(teacher_weights)
        self.distill_loss_weight = distill_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self.teachers:
            target = teacher_scores(self.teachers, self.teacher_weights, inputs, outputs.scores.device)
            loss = loss + self.distill_loss_weight * distillation_loss(outputs.scores, target)
        return (loss, outputs) if return_outputs else loss


TEACHER_INPUTS = ("pixel_values", "tile_mask", "fringe_values", "fringe_patches")


def teacher_scores(teachers, weights, inputs, device):
    """The teachers' combined scores on `inputs` (batch, labels), pooled as softmax(sum_i w_i log p_i)."""
    pooled = 0.0
    with torch.no_grad():
        for teacher, weight in zip(teachers, weights):
            if teacher.device != device:
                teacher.to(device)
            scores = teacher(**{k: v for k, v in inputs.items() if k in TEACHER_INPUTS}).scores.float()
            pooled = pooled + weight * scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
    return pooled.softmax(-1)


def distillation_loss(scores, target):
    """Cross-entropy of the model's combined scores (batch, labels) against target probabilities."""
    log_scores = scores.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return -(target * log_scores).sum(-1).mean()


def write_loss_history(log_history, output_dir):
    """Trainer's log history (every step of the run, those before a resume included: Trainer restores
    it from the checkpoint) as loss.csv, and the original's loss plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in log_history if "step" in row]
    keys = ["step"] + sorted({key for row in rows for key in row} - {"step"})
    with open(Path(output_dir) / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    for name, key, title in (("loss.png", "loss", "training loss"), ("loss-eval.png", "eval_loss", "eval loss")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(Path(output_dir) / name, dpi=100)
        plt.close(fig)


def compute_metrics_fn(arch):
    import evaluate

    metric = evaluate.load(str(ROOT / "metrics" / "classification"))

    def compute_metrics(eval_pred):
        scores = eval_pred.predictions[1] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        references = eval_pred.label_ids
        if arch == "score":
            return {"mae": float(np.abs(scores[:, 0] - references).mean())}
        result = metric.compute(predictions=scores.argmax(-1), references=references, scores=scores)
        return {k: v for k, v in result.items() if not isinstance(v, dict)}

    return compute_metrics


def highest_loss(model, ds, paths, batch_size, count):
    """The training images the model fits worst (likely mislabelled): path, label, loss, label score."""
    model.eval()
    rows = []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(**batch)
            labels = batch["labels"].long()
            losses = -out.scores.clamp_min(1e-38).log().gather(1, labels[:, None])[:, 0]  # cross-entropy
            label_scores = out.scores.gather(1, labels[:, None])[:, 0]
            for loss, label, score in zip(losses.tolist(), labels.tolist(), label_scores.tolist()):
                rows.append({"path": paths[len(rows)], "label": label, "loss": loss, "label_score": score})
    return sorted(rows, key=lambda r: r["loss"], reverse=True)[:count]


def list_highest_loss(model, images, train_ds, train_backbone, processor, labels_of, data_args, training_args, output):
    """Writes highest_loss.csv: the original's "find the mislabelled image" aid."""
    if train_backbone:  # decoding every image again is slow: look at a sample
        scan = images.shuffle(seed=training_args.seed).select(range(min(len(images), data_args.top_loss_scan)))
    else:
        scan = train_ds
    paths = [image.get("path") for image in scan.with_format(None)[IMAGE]]
    scan.set_transform(inference_transform(processor, labels_of, embedded=not train_backbone))
    worst = highest_loss(model, scan, paths, training_args.per_device_eval_batch_size, data_args.top_loss_images)
    with open(output / "highest_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "loss", "label_score"])
        writer.writeheader()
        writer.writerows(worst)
    logger.info("training images with the highest loss (likely mislabelled): %s", output / "highest_loss.csv")
    for row in worst[:5]:
        logger.info("  loss %.3f  label %s  %s", row["loss"], row["label"], row["path"])


def checkpoint_to_resume(training_args):
    """--resume_from_checkpoint, checked before any work: a path as given (refused in one line when it
    is not a complete checkpoint), or `last`/`true`: the newest complete checkpoint in the output
    folder, after a note for each newer one that a kill cut short."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        return None
    if checkpoint not in ("True", "true", "last"):
        problem = checkpoint_problem(Path(checkpoint))
        if problem:
            raise UsageError(f"--resume_from_checkpoint {checkpoint}: {problem}")
        return checkpoint
    folders = sorted((p for p in Path(training_args.output_dir).glob("checkpoint-*") if p.name[11:].isdigit()),
                     key=lambda p: int(p.name[11:]), reverse=True)
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        print(f"note: {folder} skipped: {problem} (cut short by a kill?)", file=sys.stderr)
    raise UsageError(f"{training_args.output_dir}: no complete checkpoint to resume from")


def checkpoint_problem(folder):
    """Why `folder` is not a checkpoint Trainer can resume from, or None: it must hold trainer_state.json
    and weights whose safetensors files are whole (a kill during the save leaves either out or short)."""
    from safetensors import safe_open

    if not folder.is_dir():
        return "no such checkpoint folder"
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"trainer_state.json does not read ({first_line(error)})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for file in weights:
        try:
            with safe_open(str(file), "pt"):  # checks that the header's tensors cover the file: a cut file fails
                pass
        except Exception as error:  # noqa: BLE001 - any unreadable weights file: that checkpoint is broken
            return f"{file.name} is unreadable ({first_line(error)})"
    return None


# The grid searched, 0.1 to 50 (a model fine-tuned from a calibrated one learns logits scaled by the
# temperature it was trained at, so the next one can be far from 1).
TEMPERATURES = np.exp(np.linspace(np.log(0.1), np.log(50.0), 187))
# The biases searched with --calibrate_bias, in log-odds: -6 to 6 by 0.05.
BIASES = np.round(np.linspace(-6.0, 6.0, 241), 2)


def tile_predictions(model, loader):
    """(tile log-probabilities (n, tiles, labels) with padding at 0, tile_mask (n, tiles), labels (n,))
    of a class model on every batch of `loader`, at temperature 1 and without a bias."""
    model.eval()
    saved = getattr(model.config, "score_temperature", 1.0), getattr(model.config, "score_bias", None)
    model.config.score_temperature, model.config.score_bias = 1.0, None
    logs, masks, labels = [], [], []
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(model.device) for k, v in batch.items()}
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
                logs.append(out.tile_scores.float().clamp_min(1e-30).log().nan_to_num(0.0).cpu())
                masks.append(batch["tile_mask"].bool().cpu())
                labels.append(batch["labels"].long().cpu())
    finally:
        model.config.score_temperature, model.config.score_bias = saved
    return torch.cat(logs), torch.cat(masks), torch.cat(labels)


def combined_scores(log_probs, mask, temperature, how, bias=None):
    """Tile log-probabilities at temperature 1 -> the combined scores (n, labels) at `temperature`, with
    `bias` (one number per label) added to the scaled tile logits."""
    from citytools.remote import combine_tiles

    logits = log_probs / temperature
    if bias is not None:
        logits = logits + torch.tensor(bias, dtype=logits.dtype)
    tiles = logits.softmax(-1).masked_fill(~mask[..., None], float("nan"))
    return combine_tiles(tiles, mask, how)


def calibration_loss(log_probs, mask, labels, temperature, how, bias=None):
    """Negative log-likelihood of the labels under the combined scores at `temperature` (and `bias`)."""
    scores = combined_scores(log_probs, mask, temperature, how, bias)
    return -scores.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()


def calibration_error(log_probs, mask, labels, temperature, how, bias=None):
    """The expected calibration error of the combined scores at `temperature` (and `bias`), as
    benchmark.py and the training metrics report it (metrics/classification)."""
    import evaluate

    scores = combined_scores(log_probs, mask, temperature, how, bias).numpy()
    metric = evaluate.load(str(ROOT / "metrics" / "classification"))
    return metric.compute(predictions=scores.argmax(1), references=labels.numpy(), scores=scores)["ece"]


def fit_temperature(model, loader, bias=False):
    """Temperature scaling of a class model on a validation `loader`: the grid temperature with the
    lowest negative log-likelihood of the combined scores (the tile combine of the model's config);
    with `bias`, a bias per label too (the first label's 0; Platt scaling for two labels), searched
    with the temperature one coordinate at a time over their grids until neither moves.
    -> {"temperature", "bias" (None without), "nll", "ece", "nll_at_1", "ece_at_1", "images"}; the
    model is left unchanged."""
    log_probs, mask, labels = tile_predictions(model, loader)
    how = model.config.tile_combine

    def loss(temperature, shift):
        return calibration_loss(log_probs, mask, labels, temperature, how, shift)

    shift = [0.0] * log_probs.shape[-1] if bias else None
    best = float(min(TEMPERATURES, key=lambda t: loss(t, shift)))
    for _ in range(20 if bias else 0):  # coordinate descent; each step can only lower the loss
        before = (best, list(shift))
        for k in range(1, len(shift)):
            shift[k] = float(min(BIASES, key=lambda v: loss(best, shift[:k] + [v] + shift[k + 1:])))
        best = float(min(TEMPERATURES, key=lambda t: loss(t, shift)))
        if (best, shift) == before:
            break
    for name, value, grid in [("temperature", best, TEMPERATURES)] + [("bias", v, BIASES) for v in (shift or [])[1:]]:
        if value in (grid[0], grid[-1]):
            logger.warning("calibration: the best %s, %.3g, is the edge of the grid searched (%.3g to %.3g): "
                           "the scores are calibrated as far as the grid allows, not fully", name, value, grid[0],
                           grid[-1])
    return {"temperature": best, "bias": shift, "nll": loss(best, shift),
            "ece": calibration_error(log_probs, mask, labels, best, how, shift),
            "nll_at_1": loss(1.0, None), "ece_at_1": calibration_error(log_probs, mask, labels, 1.0, how),
            "images": int(len(labels))}
