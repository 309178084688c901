"""Averages the weights of two CityClassifiers of one architecture into a new model folder:
(1 - w) * FIRST + w * SECOND, parameter by parameter (WiSE-FT, Wortsman et al. 2022: a model
fine-tuned on new data, averaged with the model it started from, keeps most of the new strengths
and most of the old ones). The shipped model's stage 5 is stage 4 averaged with its fine-tuned self.

The two must have the same configuration (labels, head, stem, fringe measurements, tiling) apart
from training settings; the output takes SECOND's configuration and processor. Both load with the
strict loader, so a folder with missing or unexpected weights is refused. Two models calibrated at
different temperatures or biases (`score_temperature`, `score_bias`) are averaged all the same, keeping
SECOND's, with a warning: calibrate the average again (`train_hf.py --num_train_epochs 0`, docs/training.md)."""

import argparse
import sys
from pathlib import Path

import torch

from citytools.models import load_scoring_model
from citytools.toolkit import UsageError, atomic_output_dir, check_output_dir

TRAINING_ONLY = ("label_loss_weights", "stem_aux_loss_weight", "native_dropout", "use_cache", "_name_or_path",
                 "transformers_version", "dtype",
                 "score_temperature", "score_bias")  # calibration: a warning in average(), not a refusal


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python average_models.py runs/default_model_stage4 runs/default_model_stage5_finetuned "
               "--weight 0.5 --out runs/default_model_stage5")
    parser.add_argument("first", help="model folder or Hub id (weight 1 - w)")
    parser.add_argument("second", help="model folder or Hub id (weight w); its config and processor are kept")
    parser.add_argument("--weight", type=float, default=0.5, help="w, between 0 and 1 (default: 0.5)")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a model folder this tool "
                        "wrote (nothing else in it, and not one of the inputs)")
    return parser.parse_args(argv)


def load(name):
    """(model, processor) in float32, by the strict, safetensors-only loader that scoring uses."""
    try:
        return load_scoring_model(name, torch.float32)
    except ValueError as error:
        raise UsageError(str(error)) from None


def architecture(config):
    """The config without its training settings, as a comparable dict."""
    fields = config.to_dict()
    for name in TRAINING_ONLY:
        fields.pop(name, None)
    fields["vision_config"] = {k: v for k, v in fields["vision_config"].items() if k not in TRAINING_ONLY}
    return fields


def average(first, second, weight):
    """(1 - weight) * first + weight * second, in place in `second`, which is returned."""
    if architecture(first.config) != architecture(second.config):
        theirs, ours = architecture(first.config), architecture(second.config)
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise UsageError(f"the two models differ in {', '.join(differ)}: only one architecture can be averaged")
    for name, what in (("score_temperature", "temperatures"), ("score_bias", "biases")):
        values = [getattr(model.config, name, None) for model in (first, second)]
        if values[0] != values[1]:
            print(f"warning: the two models were calibrated at different {what} ({values[0]} and {values[1]}); "
                  f"the average keeps {values[1]}: calibrate it again "
                  "(train_hf.py --model_name_or_path OUT --num_train_epochs 0, docs/training.md)", file=sys.stderr)
    mine = first.state_dict()
    with torch.no_grad():
        for name, tensor in second.state_dict().items():
            if tensor.is_floating_point():
                tensor.lerp_(mine[name].to(tensor.dtype), 1 - weight)
    return second


def main(argv=None):
    args = parse_args(argv)
    if not 0 <= args.weight <= 1:
        raise UsageError(f"--weight {args.weight}: not between 0 and 1")
    inputs = (args.first, args.second)
    check_output_dir(args.out, args.overwrite, inputs)  # before the models load
    (first, _), (second, processor) = load(args.first), load(args.second)
    model = average(first, second, args.weight)
    with atomic_output_dir(args.out, args.overwrite, inputs) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    print(f"wrote {args.out}: {1 - args.weight:g} x {args.first} + {args.weight:g} x {args.second}")
    return 0
