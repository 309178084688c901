"""Configuration of CityClassifier: a CLIP vision tower with city96's CityClassifiers head on top."""

import math

from transformers import CLIPVisionConfig, PretrainedConfig

from .native_fringes import native_fringe_spec, native_patch_spec, option_settings
from .tiling import TILE_COMBINES

ARCHES = ("class", "score")
VIT_L_14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14, "projection_dim": 768}  # openai/clip-vit-large-patch14-336
FRINGE_DEFAULTS = {"block": 48, "max_shift": 3, "min_edge": 0.02, "blocks": 12}

# Loaded by path with trust_remote_code, the image-classification task goes to our subclass: it
# reads files as classify.py does (EXIF, 16-bit scaled) and can drop class 0. Any other pipeline
# reports the same numbers too: see `problem_type` below.
CUSTOM_PIPELINES = {
    "image-classification": {
        "impl": "modeling_cityclassifier.CityClassifierImageClassificationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "type": "image",
    }
}


class CityClassifierConfig(PretrainedConfig):
    """Holds the backbone's `CLIPVisionConfig`, the head sizes and how tile scores are combined.

    Args:
        vision_config: a `CLIPVisionConfig` (copied) or its dict; `projection_dim` is the head's input
            size. Default: ViT-L/14 at 336 px, the original's backbone, matching the processor's default.
        arch: "class" (softmax over `num_labels` outputs) or "score" (one output, (tanh(z) + 1) / 2).
        head_hidden_size: width of the head's residual block (1024 in every released model).
        head_dropout: dropout before the head's LeakyReLU (0.1 in the original).
        tile_combine: how per-tile probabilities become one row: "mean", "median", "max" or "min".
        label_loss_weights: per-label cross-entropy weights, indexed like `id2label`.
        stem: None (the original: pixels go straight into CLIP), or a convolutional stem run on the
            pixels first, a hybrid ViT: {"channels": [16, 16], "kernel_sizes": [5, 3], "strides": [1, 2],
            "pool": 4}: each conv followed by a GELU, then a `pool` x `pool` max-pool. CLIP then sees
            `channels[-1]` channels (its `num_channels` is set to that) at `image_size` = pixel size /
            (product(strides) * pool). Colour fringes are a per-pixel misalignment of R and B against G,
            thin and sparse: a large-patch ViT's linear patch embedding averages them away, while a few
            full-resolution convolutions see them and a max-pool keeps them.
        stem_aux_loss_weight: in training only, adds this weight times the loss of a linear probe on
            the stem's pooled features (deep supervision: gives the stem a direct signal early on).
        native_dropout: in training only, the share of pictures whose native-resolution inputs (the
            measurements and the patch stream's features) the head sees as zeros, so that the views
            alone must also tell a fringe (modality dropout; 0, the default, drops none).
        fringe_features: None (the original), or measurements of how far red and blue edges sit from
            green ones in each view (`CityClassifierFringe`), appended to CLIP's embedding as the
            head's input: True for the defaults, or {"block": 48, "max_shift": 3, "min_edge": 0.02,
            "blocks": 12} (block side and largest shift in view pixels; the smallest mean green
            gradient, in normalised units, of a block that is measured; how many of the blocks with
            most edges are measured).
        native_fringes: None, or the picture's fringes measured by its processor over the whole
            picture at native resolution (`native_fringes.measure_fringes`, the processor's
            `fringe_values`), appended to every view's head input: True for the defaults, or a dict
            of `native_fringes.NATIVE_FRINGE_DEFAULTS`' keys. The processor must measure them with the
            same settings (its own `native_fringes`).
        native_patches: None, or a learned stream at native resolution (`CityClassifierPatchStream`):
            the `count` most edge-rich `size` x `size` blocks of the picture at the native
            measurement's work size, unresized (the processor's `fringe_patches`), read by a small
            CNN `channels` wide; its pooled features are appended to every view's head input, after
            the native measurements. True for the defaults ({"count": 32, "size": 32, "channels": 16})
            or a dict of those keys; needs `native_fringes` (the blocks are picked as it picks them).
        score_temperature: class models' tile logits are divided by it before the softmax (1.0, the
            original: exact). Fitted on validation by train_hf.py (`--calibrate`), so that a score of
            0.5 means even odds.
        score_bias: None, or class models' per-label numbers added to the tile logits after the
            temperature (the first label's 0): fitted with it by train_hf.py `--calibrate_bias`, for
            a model whose even odds the temperature cannot reach (one trained with unequal
            `label_loss_weights` puts its 0.5 where the odds are not even).
    """

    model_type = "cityclassifier"
    sub_configs = {"vision_config": CLIPVisionConfig}
    keys_to_ignore_at_inference = ["tile_scores", "image_embeds"]  # Trainer keeps (logits, scores)

    def __init__(
        self,
        vision_config=None,
        arch="class",
        head_hidden_size=1024,
        head_dropout=0.1,
        tile_combine="mean",
        label_loss_weights=None,
        stem=None,
        stem_aux_loss_weight=0.0,
        native_dropout=0.0,
        fringe_features=None,
        native_fringes=None,
        native_patches=None,
        score_temperature=1.0,
        score_bias=None,
        **kwargs,
    ):
        if arch not in ARCHES:
            raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
        if tile_combine not in TILE_COMBINES:
            raise ValueError(f"tile_combine must be one of {TILE_COMBINES}, got {tile_combine!r}")
        if not isinstance(head_hidden_size, int) or head_hidden_size < 1:
            raise ValueError(f"head_hidden_size must be a positive integer, got {head_hidden_size!r}")
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout!r}")
        if arch == "score":
            kwargs.setdefault("id2label", {0: "score"})
        elif "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = {0: "Pass", 1: "Chromatic Aberration"}
        # What this model's `logits` are: per label, the log-odds of its score (scores are per-label
        # probabilities that are not renormalised, or the score model's value in [0, 1]), so every
        # pipeline's default, a sigmoid for multi-label models, reports the original's numbers. A
        # value saved by older versions of this code (regression, or none) is superseded.
        kwargs["problem_type"] = "multi_label_classification"
        kwargs.setdefault("custom_pipelines", CUSTOM_PIPELINES)
        super().__init__(**kwargs)
        if not getattr(self, "label2id", None):
            self.label2id = {name: int(i) for i, name in self.id2label.items()}

        self.vision_config = self.vision_spec(vision_config)
        self.arch = arch
        self.head_hidden_size = head_hidden_size
        self.head_dropout = head_dropout
        self.tile_combine = tile_combine

        if arch == "score" and self.num_labels != 1:
            raise ValueError(f"id2label must have exactly one label for arch='score', got {self.num_labels}")
        if arch == "class" and self.num_labels < 2:
            raise ValueError(f"id2label must have at least two labels for arch='class', got {self.num_labels}")
        self.label_loss_weights = self.loss_weights(label_loss_weights, self.num_labels)

        stem = self.stem_spec(stem)
        if stem is not None:
            self.vision_config.num_channels = stem["channels"][-1]
        if stem_aux_loss_weight < 0:
            raise ValueError(f"stem_aux_loss_weight must be >= 0, got {stem_aux_loss_weight}")
        self.stem = stem
        self.stem_aux_loss_weight = float(stem_aux_loss_weight)
        if not (isinstance(native_dropout, (int, float)) and 0.0 <= native_dropout < 1.0):
            raise ValueError(f"native_dropout must be in [0, 1), got {native_dropout!r}")
        self.native_dropout = float(native_dropout)
        self.fringe_features = self.fringe_spec(fringe_features)
        self.native_fringes = native_fringe_spec(native_fringes)
        self.native_patches = native_patch_spec(native_patches)
        if self.native_patches and not self.native_fringes:
            raise ValueError("native_patches needs native_fringes (the patches are picked at its work size)")
        self.score_temperature = self.positive_number(score_temperature, "score_temperature")
        self.score_bias = self.bias_spec(score_bias, arch, self.num_labels)

    @staticmethod
    def bias_spec(value, arch, num_labels):
        """score_bias as a list of `num_labels` finite floats (a class model's), or None."""
        if value is None:
            return None
        if arch != "class" or not isinstance(value, (list, tuple)) or len(value) != num_labels or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise ValueError(f"score_bias must be None or {num_labels} finite numbers of a class model, got {value!r}")
        return [float(v) for v in value]

    @staticmethod
    def positive_number(value, name):
        """`value` as a float, or a ValueError naming `name` when it is not a finite number above 0."""
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
        return float(value)

    @staticmethod
    def vision_spec(vision_config):
        """A CLIPVisionConfig of our own (the stem changes num_channels): ViT-L/14-336 when None (the
        original's backbone; the processor's 336 px), else a copy of the given config or dict."""
        if vision_config is None:
            return CLIPVisionConfig(**VIT_L_14_336)
        if isinstance(vision_config, dict):
            return CLIPVisionConfig(**vision_config)
        return CLIPVisionConfig(**vision_config.to_dict())

    @staticmethod
    def stem_spec(stem):
        """`stem` as stored: None, or {"channels", "kernel_sizes", "strides": equally long lists of
        positive ints (odd kernels, "same" padding), "pool": positive int}; ValueError otherwise."""
        if stem is None:
            return None
        pool = stem.get("pool", 1)
        stem = {"channels": [int(c) for c in stem["channels"]],
                "kernel_sizes": [int(k) for k in stem.get("kernel_sizes", [3] * len(stem["channels"]))],
                "strides": [int(s) for s in stem.get("strides", [1] * len(stem["channels"]))]}
        lengths = {len(v) for v in stem.values()}
        if len(lengths) != 1 or 0 in lengths or min(min(v) for v in stem.values()) < 1:
            raise ValueError(f"stem needs equally long, non-empty lists of positive channels, kernel_sizes "
                             f"and strides, got {stem}")
        stem["pool"] = int(pool)
        if stem["pool"] < 1:
            raise ValueError(f"stem pool must be a positive integer, got {pool}")
        if any(k % 2 == 0 for k in stem["kernel_sizes"]):
            raise ValueError(f"stem kernel_sizes must be odd (same padding), got {stem['kernel_sizes']}")
        return stem

    @staticmethod
    def loss_weights(value, num_labels):
        """`label_loss_weights` as stored: None -> 1.0 per label, else `num_labels` positive floats."""
        weights = [1.0] * num_labels if value is None else [float(w) for w in value]
        if len(weights) != num_labels or min(weights) <= 0:
            raise ValueError(f"label_loss_weights must hold {num_labels} positive numbers (one per label), "
                             f"got {weights}")
        return weights

    @staticmethod
    def fringe_spec(value):
        """`fringe_features` as stored: None/False -> None, True -> the defaults, a dict -> completed and checked."""
        spec = option_settings(value, FRINGE_DEFAULTS, "fringe_features")
        if spec is None:
            return None
        spec = {"block": int(spec["block"]), "max_shift": int(spec["max_shift"]), "min_edge": float(spec["min_edge"]),
                "blocks": int(spec["blocks"])}
        if (spec["max_shift"] < 1 or spec["block"] < 2 * spec["max_shift"] + 2 or spec["min_edge"] < 0
                or spec["blocks"] < 1):
            raise ValueError(f"fringe_features needs max_shift >= 1, block >= 2 * max_shift + 2, min_edge >= 0 and "
                             f"blocks >= 1, got {spec}")
        return spec

    @property
    def pixel_size(self):
        """The side of the pixel views the model takes: CLIP's image_size times the stem's strides and pool."""
        stem = self.stem or {"strides": [], "pool": 1}
        return self.vision_config.image_size * stem["pool"] * math.prod(stem["strides"])


__all__ = ["CityClassifierConfig"]
