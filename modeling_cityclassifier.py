"""CityClassifier: CLIP image embeddings, city96's PredictorModel head, and tile scores combined in the model."""

from dataclasses import dataclass

import PIL.Image
import PIL.ImageOps
import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection, ImageClassificationPipeline, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_cityclassifier import CityClassifierConfig
from .fringes import CPU_CHUNK_BYTES, FRINGE_FEATURES, CityClassifierFringe
from .image_processing import to_device
from .native_fringes import native_feature_names, native_fringe_spec, native_patch_spec
from .tiling import TILE_COMBINES


@dataclass
class CityClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the combined scores and what each tile saw.

    Args:
        logits: (batch, num_labels): the log-odds of `scores`, log(s) - log(1 - s), so a sigmoid gives
            them back (the multi-label convention, `config.problem_type`: what any image-classification
            pipeline applies). For a score model that is 2z, as (tanh(z) + 1) / 2 = sigmoid(2z).
        scores: (batch, num_labels), the original's numbers: combined probabilities, not renormalised,
            or the (tanh(z) + 1) / 2 score.
        tile_scores: (batch, tiles, num_labels), per tile; NaN where `tile_mask` is 0.
        image_embeds: (batch, tiles, features), what the head took per tile: the projected,
            un-normalised CLIP embeddings, then the fringe measurements when the config has them.
    """

    scores: torch.FloatTensor | None = None
    tile_scores: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


class CityClassifierResBlock(nn.Module):
    """The original's residual block: ReLU(long(x) + x)."""

    def __init__(self, size):
        super().__init__()
        self.long = nn.Sequential(
            nn.Linear(size, size),
            nn.LeakyReLU(0.1),
            nn.Linear(size, size),
            nn.LeakyReLU(0.1),
            nn.Linear(size, size),
        )

    def forward(self, x):
        return nn.functional.relu(self.long(x) + x)


class CityClassifierHead(nn.Module):
    """city96's PredictorModel without its output function; state-dict keys match the released files."""

    def __init__(self, features, hidden, outputs, dropout=0.1):
        super().__init__()
        self.up = nn.Sequential(nn.Linear(features, hidden), CityClassifierResBlock(hidden))
        self.down = nn.Sequential(
            nn.Linear(hidden, 128),
            nn.Linear(128, 64),
            nn.Dropout(dropout),
            nn.LeakyReLU(),
            nn.Linear(64, 32),
            nn.Linear(32, outputs),
        )

    def forward(self, x):
        x = self.up(x)
        x = self.down(x)
        return x


class CityClassifierStem(nn.Module):
    """Full-resolution convolutions (each followed by a GELU), then an optional max-pool, in front of
    the CLIP tower; and the linear probe on their pooled output that `stem_aux_loss_weight` trains
    (unused at inference)."""

    def __init__(self, stem, outputs):
        super().__init__()
        layers, channels = [], 3
        for out_channels, kernel, stride in zip(stem["channels"], stem["kernel_sizes"], stem["strides"]):
            layers += [nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=kernel // 2), nn.GELU()]
            channels = out_channels
        if stem["pool"] > 1:
            layers.append(nn.MaxPool2d(stem["pool"]))
        self.layers = nn.Sequential(*layers)
        self.probe = nn.Linear(2 * channels, outputs)

    def forward(self, pixel_values):
        # Channels-last is the layout oneDNN (and cuDNN) run full-resolution convolutions fastest in
        # (docs/speed.md); the same maths up to float rounding.
        return self.layers(pixel_values.contiguous(memory_format=torch.channels_last))

    def probe_logits(self, features):
        """(n, C, h, w) stem features -> (n, outputs): a linear probe on their spatial mean and max."""
        return self.probe(torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1))


class CityClassifierPatchStream(nn.Module):
    """A small CNN over the picture's most edge-rich patches at native resolution (the processor's
    `fringe_patches`): each patch as red - green, blue - green (both x4) and green, two 3x3
    convolutions, a dilated one (GELU after each) and a 1x1, pooled by mean and max over the patch,
    then by mean and max over the patches: `features(spec)` numbers a picture, before any resize."""

    def __init__(self, spec):
        super().__init__()
        width = spec["channels"]
        self.layers = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU(), nn.Conv2d(width, 2 * width, 1))
        self.spec = spec

    @staticmethod
    def features(spec):
        return 8 * spec["channels"]

    def forward(self, patches):
        """(batch, count, 3, size, size) uint8 -> (batch, features) float32; on a CPU a few pictures at a
        time (see CityClassifierForImageClassification._stem_features)."""
        batch, count, _, size, _ = patches.shape
        chunk = len(patches)
        if patches.device.type == "cpu":
            chunk = max(1, CPU_CHUNK_BYTES // (count * 2 * self.spec["channels"] * size * size * 4))
        return torch.cat([self._pictures(part) for part in patches.split(chunk)])

    def _pictures(self, patches):
        batch, count = patches.shape[:2]
        x = patches.flatten(0, 1).to(self.layers[0].weight.dtype) / 255
        x = torch.stack([(x[:, 0] - x[:, 1]) * 4, (x[:, 2] - x[:, 1]) * 4, x[:, 1]], dim=1)
        y = self.layers(x.contiguous(memory_format=torch.channels_last))
        # The largest value of each map as a max-pool over the whole map: the same numbers as
        # y.amax((2, 3)), which torch reduces far more slowly over channels-last maps on a CPU (docs/speed.md)
        peak = nn.functional.max_pool2d(y, y.shape[-2:]).flatten(1)
        y = torch.cat([y.mean((2, 3)), peak], dim=1).view(batch, count, -1)
        return torch.cat([y.mean(1), y.amax(1)], dim=1)


class Float32Convolution(nn.Conv2d):
    """A convolution that computes in float32 whatever dtype its weights and input are in, also under
    autocast, and hands back its input's dtype: the CLIP tower's patch embedding. Half-precision
    convolution kernels are where CPUs differ most: oneDNN 3.12's AMX bf16 kernel
    (brg_conv_fwd:avx10_1_512_amx, torch 2.13) returns wrong values for a kernel-sized stride over 16
    input channels, the shipped model's patch embedding on its stem's features (docs/model.md,
    precision). In float32 it is a small share of the tower's work; the tower's transformer layers,
    nearly all of it, still run in the dtype asked for."""

    def forward(self, input):
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(input.device.type, enabled=False):
            out = self._conv_forward(input.float(), self.weight.float(), bias)
        return out.to(input.dtype)


def scatter_tiles(values, tile_mask):
    """(real tiles, d) values, in order -> (batch, tiles, d), zeros in the padding slots of `tile_mask`.
    The mask may stay on the CPU while the values are on a GPU: the real slots are then found on the
    CPU and their indices copied without waiting, where a boolean index on the GPU would make the
    host wait for the GPU's queue (the whole backbone) before it could queue anything else."""
    batch, tiles = tile_mask.shape
    out = values.new_zeros(batch * tiles, values.shape[-1])
    real = to_device(tile_mask.flatten().nonzero().squeeze(1), out.device)
    return out.index_copy_(0, real, values).view(batch, tiles, -1)  # (batch*tiles, d) -> (batch, tiles, d)


def combine_tiles(tile_scores, tile_mask, how):
    """Combines (batch, tiles, labels) scores over the valid tiles, per label, without renormalising."""
    valid = tile_mask.bool()[..., None]  # (batch, tiles) -> (batch, tiles, 1)
    if how == "mean":
        return (tile_scores.nan_to_num() * valid).sum(1) / valid.sum(1)
    if how == "max":
        return tile_scores.masked_fill(~valid, float("-inf")).amax(1)
    if how == "min":
        return tile_scores.masked_fill(~valid, float("inf")).amin(1)
    if how == "median":
        return tile_scores.masked_fill(~valid, float("nan")).nanmedian(1).values
    raise ValueError(f"tile_combine must be one of {', '.join(TILE_COMBINES)}, got {how!r}")


class CityClassifierPreTrainedModel(PreTrainedModel):
    """Weight init and loading plumbing shared by CityClassifier models."""

    config_class = CityClassifierConfig
    base_model_prefix = "clip"  # the CLIP tower: `model.base_model`
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True  # the CLIP encoder's layers
    _no_split_modules = ["CLIPEncoderLayer"]
    # The head (and the stem, where there is one: see CityClassifierForImageClassification.__init__)
    # stay float32 whatever dtype the model is loaded in; bf16 or fp16 put only the CLIP tower in that
    # precision, and its patch embedding computes in float32 all the same (Float32Convolution). The
    # stem reads pixel differences of one grey level, which bf16's 8-bit mantissa cannot hold, and a
    # head's rounding moves a score near 0.5 across the threshold: precision must never change a decision.
    _keep_in_fp32_modules_strict = ["head"]
    _supports_sdpa = True  # the CLIP tower supports it, and it is the fast attention on CPU and GPU

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a checkpoint that does not hold every weight of
        the model in its shape, or holds others, is an error naming them: a model with random
        weights must never score. `output_loading_info=True` loads it anyway, to inspect."""
        inspect = kwargs.get("output_loading_info", False)
        allow_mismatch = kwargs.get("ignore_mismatched_sizes", False)
        kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)  # report mismatches by name below
        model, info = super().from_pretrained(*args, **kwargs)
        if inspect:
            return model, info
        kinds = ("missing_keys", "unexpected_keys") + (() if allow_mismatch else ("mismatched_keys",))
        problems = {kind: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
                    for kind in kinds}
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            shown = "; ".join(f"{kind.replace('_', ' ')} ({len(keys)}): {', '.join(keys[:4])}"
                              + (", ..." if len(keys) > 4 else "") for kind, keys in problems.items())
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{source}: the checkpoint does not match the model ({shown}); refusing to score "
                             "with partly random weights")
        return model

    def _init_weights(self, module):
        # Only the head (the CLIP tower is a PreTrainedModel and initialises its own modules), with
        # PyTorch's default Linear init as the original had: a small normal init stalls its deep MLP.
        # The stem's convolutions keep the default init they were built with.
        if isinstance(module, nn.Linear):
            module.reset_parameters()


class CityClassifierForImageClassification(CityClassifierPreTrainedModel):
    """CLIP vision tower with projection, then the CityClassifiers head, one row of logits per image.

    The backbone is a `CLIPVisionModelWithProjection` under `clip.` and the head holds the original's
    state-dict keys under `head.`, so both load from their own checkpoints by a prefix alone.
    """

    def __init__(self, config: CityClassifierConfig):
        super().__init__(config)
        self.stem = CityClassifierStem(config.stem, config.num_labels) if config.stem else None
        config.vision_config._attn_implementation = config._attn_implementation  # attn_implementation= reaches CLIP
        self.clip = CLIPVisionModelWithProjection(config.vision_config)
        self.clip.vision_model.embeddings.patch_embedding.__class__ = Float32Convolution  # same weights, float32 sums
        self.fringe = CityClassifierFringe(config.fringe_features) if config.fringe_features else None
        patches = getattr(config, "native_patches", None)
        self.patch_stream = CityClassifierPatchStream(patches) if patches else None
        self.head = CityClassifierHead(self.head_inputs(config), config.head_hidden_size, config.num_labels,
                                       config.head_dropout)
        self.post_init()
        self._keep_fp32()

    def _keep_fp32(self):
        """The stem, the patch stream and the head stay float32 when the model is loaded with `dtype=`
        (set after post_init, which refuses a name that is not a module of every instance)."""
        kept = {"stem"} if self.stem is not None else set()
        kept |= {"patch_stream"} if self.patch_stream is not None else set()
        if kept:
            self._keep_in_fp32_modules_strict = {"head", *kept}

    @staticmethod
    def head_inputs(config):
        """The head's input size: CLIP's projection, plus the per-view fringe measurements, the
        picture's native-resolution ones and its patch stream's features when configured."""
        patches = getattr(config, "native_patches", None)
        native = getattr(config, "native_fringes", None)
        return (config.vision_config.projection_dim + (len(FRINGE_FEATURES) if config.fringe_features else 0)
                + (len(native_feature_names(native)) if native else 0)
                + (CityClassifierPatchStream.features(patches) if patches else 0))

    def add_native_fringes(self, spec=None):
        """Turns on the picture's native-resolution fringe measurements (`config.native_fringes`,
        default settings when `spec` is None): the head's first layer gets zero weights for the new
        inputs, so the model scores exactly as before until it is trained. Its processor must
        measure them too (`CityClassifierImageProcessor(native_fringes=...)`)."""
        if getattr(self.config, "native_fringes", None):
            return self
        self.config.native_fringes = native_fringe_spec(spec if spec is not None else True)
        self._grow_head_inputs()
        return self

    def add_native_patches(self, spec=None):
        """Turns on the learned native-resolution patch stream (`config.native_patches`, default
        settings when `spec` is None) in a model that reads native fringes: a new
        `CityClassifierPatchStream`, and zero head weights for its features, so the model scores
        exactly as before until it is trained. Its processor must cut the patches too
        (`CityClassifierImageProcessor(native_patches=...)`)."""
        if self.patch_stream is not None:
            return self
        if not getattr(self.config, "native_fringes", None):
            raise ValueError("native_patches needs native_fringes: add_native_fringes first")
        self.config.native_patches = native_patch_spec(spec if spec is not None else True)
        self.patch_stream = CityClassifierPatchStream(self.config.native_patches).to(self.head.up[0].weight.device)
        self._grow_head_inputs()
        self._keep_fp32()
        return self

    def add_native_size(self):
        """Gives the head how much evidence the native measurements rest on (`native_fringes` with
        `size` on: the picture's long side and the blocks measured, NATIVE_SIZE_FEATURES), so that it
        can lean on the enlarged views where a picture is small: zero head weights for them, so the
        model scores exactly as before until it is trained. Its processor must measure them too (the
        same `native_fringes` settings)."""
        spec = getattr(self.config, "native_fringes", None)
        if not spec:
            raise ValueError("the size features need native_fringes: add_native_fringes first")
        if spec["size"]:
            return self
        at = self.head_inputs(self.config) - (CityClassifierPatchStream.features(self.config.native_patches)
                                              if self.patch_stream is not None else 0)
        self.config.native_fringes = native_fringe_spec({**spec, "size": True})
        self._grow_head_inputs(at)
        return self

    def _grow_head_inputs(self, at=None):
        """A new first head layer for `head_inputs(config)` inputs: the old weights, zeros for the new
        inputs, which come at input `at` (None: last)."""
        old = self.head.up[0]
        new = nn.Linear(self.head_inputs(self.config), old.out_features).to(old.weight.device, old.weight.dtype)
        at = old.in_features if at is None else at
        added = new.in_features - old.in_features
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :at] = old.weight[:, :at]
            new.weight[:, at + added :] = old.weight[:, at:]
            new.bias.copy_(old.bias)
        self.head.up[0] = new

    def add_fringe_features(self, spec=None):
        """Turns on the fringe measurements (`CityClassifierConfig.fringe_features`, default settings
        when `spec` is None) in a model without them: the head's first layer gets zero weights for
        the new inputs, so the model scores exactly as before until it is trained."""
        if self.fringe is not None:
            return self
        if getattr(self.config, "native_fringes", None):  # their columns come before the native ones
            raise ValueError("add the per-view fringe features before the native ones (add_native_fringes)")
        self.config.fringe_features = type(self.config).fringe_spec(spec if spec is not None else True)
        self.fringe = CityClassifierFringe(self.config.fringe_features)
        self._grow_head_inputs()
        return self

    def get_image_features(self, pixel_values):
        """(n, 3, H, W) pixels -> (n, features) what the head takes: the projected, un-normalised CLIP
        embeddings, as the original uses, followed by the fringe measurements when configured."""
        return self._embed(pixel_values)[0]

    def embed_tiles(self, pixel_values, tile_mask):
        """The real tiles' pixels (n, 3, H, W) in batch order, or an iterable of such chunks (to bound
        memory) -> (batch, tiles, projection_dim) embeddings, zeros in the padding slots of `tile_mask`
        (batch, tiles): what `forward` gives the head, for tools that embed once for several heads or
        cache embeddings (`forward(image_embeds=..., tile_mask=...)` takes them back)."""
        chunks = [pixel_values] if torch.is_tensor(pixel_values) else pixel_values
        return scatter_tiles(torch.cat([self.get_image_features(chunk) for chunk in chunks]), tile_mask)

    def _embed(self, pixel_values, **clip_options):
        """(head inputs, stem features or None, CLIP's output) of (n, 3, H, W) pixels: the head's
        inputs are CLIP's projected embeddings, then the fringe measurements if configured.
        `clip_options` (output_hidden_states, output_attentions) go to the CLIP tower."""
        fringe = self.fringe(pixel_values) if self.fringe is not None else None  # float32, on the exact pixels
        features = None
        if self.stem is not None:
            with torch.autocast(pixel_values.device.type, enabled=False):  # float32 under a caller's autocast too
                features = self._stem_features(pixel_values.to(self.stem.layers[0].weight.dtype))
        tower_input = features if features is not None else pixel_values
        clip = self.clip(pixel_values=tower_input.to(self.clip.dtype), **clip_options)
        embeds = clip.image_embeds.to(self.head_dtype)
        if fringe is not None:
            embeds = torch.cat([embeds, fringe.to(embeds.dtype)], dim=-1)
        return embeds, features, clip

    @property
    def head_dtype(self):
        """The head's dtype (float32 unless a user cast it): what its inputs are cast to."""
        return self.head.up[0].weight.dtype

    def _stem_features(self, pixel_values):
        """The stem on (n, 3, H, W) pixels; on a CPU a few views at a time. Its first activations are
        large (16 channels at the view's full resolution), and glibc hands blocks above its mmap
        threshold out as fresh pages from the kernel on every call, page faults that cost more than
        the convolutions: chunks under CPU_CHUNK_BYTES reuse the heap (docs/speed.md)."""
        if pixel_values.device.type != "cpu":
            return self.stem(pixel_values)
        stem = self.config.stem
        view_bytes = (stem["channels"][0] * pixel_values[0, 0].numel() * pixel_values.element_size()
                      // stem["strides"][0] ** 2)
        chunk = max(1, CPU_CHUNK_BYTES // max(1, view_bytes))
        return torch.cat([self.stem(views) for views in pixel_values.split(chunk)])

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()`, `.bfloat16()` keep the stem and the head in float32, as loading with
        `dtype=` does (`_keep_in_fp32_modules_strict`)."""
        super()._apply(fn, recurse)
        for module in (self.stem, self.patch_stream, self.head):
            if module is not None and any(p.dtype != torch.float32 for p in module.parameters()):
                module.float()
        return self

    def backbone_modules(self):
        """What turns pixels into embeddings (the stem, if any, and the CLIP tower): frozen in head-only training."""
        return [self.stem, self.clip] if self.stem is not None else [self.clip]

    def forward(
        self,
        pixel_values=None,
        tile_mask=None,
        image_embeds=None,
        labels=None,
        fringe_values=None,
        fringe_patches=None,
        tile_combine=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        **kwargs,
    ):
        """
        Args:
            pixel_values: (batch, tiles, 3, H, W) from `CityClassifierImageProcessor`, or (batch, 3, H, W).
            tile_mask: (batch, tiles), 1 for real tiles and 0 for padding; all ones when omitted.
            image_embeds: (batch, tiles, dim) or (batch, dim) precomputed embeddings, instead of pixels.
            labels: (batch,) label ids for class models, or scores in [0, 1] for score models.
            fringe_values: (batch, len(native_feature_names(config.native_fringes))) from the processor, the picture's
                fringes at native resolution: needed by a model with `config.native_fringes`, ignored
                by one without (as a processor that measures them may serve either).
            fringe_patches: (batch, count, 3, size, size) uint8 from the processor, the picture's most
                edge-rich native-resolution patches: needed by a model with `config.native_patches`,
                ignored by one without.
            tile_combine: overrides `config.tile_combine` for this call.
            output_hidden_states, output_attentions: the CLIP tower's, per real view (padding tiles
                never reach it): tuples of (views, tokens, ...) tensors, views in batch order.
            return_dict: False returns a tuple, as transformers' models do.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        clip_options = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("pass exactly one of pixel_values and image_embeds")
        if image_embeds is None:
            image_embeds, tile_mask, stem_features, clip = self._tile_embeds(pixel_values, tile_mask, clip_options)
        else:
            stem_features = clip = None
            if image_embeds.ndim == 2:
                image_embeds = image_embeds[:, None]  # (batch, dim) -> (batch, 1, dim)
            if tile_mask is None:
                tile_mask = torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=image_embeds.device)

        how = tile_combine or self.config.tile_combine
        with torch.autocast(image_embeds.device.type, enabled=False):  # as the stem: float32 under autocast too
            z = self.head(self._head_input(image_embeds, fringe_values, fringe_patches))
            z = z.float()  # (batch, tiles, num_labels)
        tile_scores, scores, logits = self._combine(z, tile_mask, how)

        loss = None
        if labels is not None:
            loss = self._loss(scores, labels)
            if self.training and stem_features is not None and self.config.stem_aux_loss_weight > 0:
                probe = scatter_tiles(self.stem.probe_logits(stem_features).float(), tile_mask)
                probe_scores = self._combine(probe, tile_mask, how)[1]
                loss = loss + self.config.stem_aux_loss_weight * self._loss(probe_scores, labels)

        output = CityClassifierOutput(
            loss=loss, logits=logits, scores=scores, tile_scores=tile_scores, image_embeds=image_embeds,
            hidden_states=clip.hidden_states if clip is not None else None,
            attentions=clip.attentions if clip is not None else None,
        )
        return output if return_dict else output.to_tuple()

    def _tile_embeds(self, pixel_values, tile_mask, clip_options):
        """pixel_values (batch, tiles, 3, H, W) or (batch, 3, H, W) -> (image_embeds (batch, tiles, dim),
        the tile mask (all ones when None), the stem's features of the real views, CLIP's output).
        Padding tiles never reach the backbone."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]  # (batch, 3, H, W) -> (batch, 1, 3, H, W)
        batch, tiles = pixel_values.shape[:2]
        if tile_mask is None:
            tile_mask = torch.ones(batch, tiles, dtype=torch.bool, device=pixel_values.device)
        flat = pixel_values.flatten(0, 1)  # (batch, tiles, 3, H, W) -> (batch*tiles, 3, H, W)
        embeds, stem_features, clip = self._embed(flat[tile_mask.bool().flatten()], **clip_options)
        return scatter_tiles(embeds, tile_mask), tile_mask, stem_features, clip

    def _head_input(self, image_embeds, fringe_values, fringe_patches=None):
        """(batch, tiles, dim) embeddings, with the picture's native fringe measurements (batch, F),
        log1p-compressed (px and gains, all >= 0), and its patch stream's features appended to every
        view when configured."""
        x = image_embeds.to(self.head_dtype)
        if not getattr(self.config, "native_fringes", None):
            return x
        if fringe_values is None:
            raise ValueError("this model reads the picture's fringes at native resolution: pass fringe_values "
                             "from its processor (CityClassifierImageProcessor with native_fringes)")
        count = len(native_feature_names(self.config.native_fringes))
        if fringe_values.shape != (x.shape[0], count):
            raise ValueError(f"fringe_values must be (batch, {count}) = ({x.shape[0]}, {count}) for this model's "
                             f"native_fringes settings, got {tuple(fringe_values.shape)}")
        native = fringe_values.to(x.device, torch.float32).clamp_min(0).log1p().to(x.dtype)
        if self.patch_stream is not None:
            native = torch.cat([native, self._patch_features(fringe_patches, x)], dim=-1)
        dropout = getattr(self.config, "native_dropout", 0.0)
        if self.training and dropout > 0:  # whole pictures' native inputs, unscaled: the views must tell alone
            native = native * (torch.rand(native.shape[0], 1, device=native.device) >= dropout).to(native.dtype)
        return torch.cat([x, native[:, None].expand(-1, x.shape[1], -1)], dim=-1)

    def _patch_features(self, fringe_patches, x):
        """The patch stream's (batch, features) on the processor's patches, checked against the config."""
        spec = self.config.native_patches
        expected = (x.shape[0], spec["count"], 3, spec["size"], spec["size"])
        if fringe_patches is None:
            raise ValueError("this model reads the picture's native-resolution patches: pass fringe_patches "
                             "from its processor (CityClassifierImageProcessor with native_patches)")
        if tuple(fringe_patches.shape) != expected or fringe_patches.dtype != torch.uint8:
            raise ValueError(f"fringe_patches must be uint8 {expected}, got {fringe_patches.dtype} "
                             f"{tuple(fringe_patches.shape)}")
        return self.patch_stream(fringe_patches.to(x.device)).to(x.dtype)

    def _combine(self, z, tile_mask, how):
        """Head outputs (batch, tiles, labels) -> (tile_scores, combined scores, logits)."""
        temperature = getattr(self.config, "score_temperature", 1.0)
        if self.config.arch == "class" and temperature != 1.0:
            z = z / temperature
        if self.config.arch == "class" and getattr(self.config, "score_bias", None):
            z = z + self._constant("score_bias", z)
        tile_scores = z.softmax(-1) if self.config.arch == "class" else (z.tanh() + 1) / 2
        tile_scores = tile_scores.masked_fill(~tile_mask.bool()[..., None], float("nan"))
        scores = combine_tiles(tile_scores, tile_mask, how)
        finfo = torch.finfo(scores.dtype)
        s = scores.clamp(finfo.tiny, 1 - finfo.eps / 2)  # 0 and 1 would give infinite log-odds
        return tile_scores, scores, s.log() - (-s).log1p()  # (batch, labels) log-odds

    def _constant(self, name, like):
        """config.`name` (a list of numbers) as a tensor on `like`'s device and dtype, made once: a tensor
        made from a list on every step is a copy to the GPU that waits for it (a batch-1 head step is
        all such fixed costs)."""
        key = (like.device, like.dtype, tuple(getattr(self.config, name)))
        cache = getattr(self, "_constants", None)
        if cache is None:
            cache = self._constants = {}
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, like.new_tensor(key[2]))
        return cache[name][1]

    def _loss(self, scores, labels):
        """Class models: cross-entropy with the label weights on the combined probabilities; score
        models: squared error of the score."""
        labels = labels.to(scores.device)
        if self.config.arch == "class":
            weight = self._constant("label_loss_weights", scores)
            return nn.functional.nll_loss(scores.clamp_min(torch.finfo(scores.dtype).tiny).log(), labels.long(),
                                          weight=weight)
        return nn.functional.mse_loss(scores.squeeze(-1), labels.to(scores.dtype).view(-1))


class CityClassifierImageClassificationPipeline(ImageClassificationPipeline):
    """The image-classification pipeline, returning the model's `scores` as the original prints them.

    The stock pipeline gives the same numbers for RGB pictures (a sigmoid of the log-odds `logits`)
    but converts every picture to RGB first; this one hands images to the processor in their own
    mode (16-bit scaled, not clipped; non-RGB modes resized as the original did), and, as the
    original's option, leaves class 0 ("Pass") out with `drop_class_0=True`.
    """

    def _sanitize_parameters(self, drop_class_0=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if drop_class_0 is not None:
            postprocess["drop_class_0"] = bool(drop_class_0)
        return preprocess, forward, postprocess

    def check_model_type(self, supported_models):
        pass  # our model class is registered with the Auto classes only when loaded as remote code

    def preprocess(self, image, timeout=None):
        if isinstance(image, str):
            if image.startswith(("http://", "https://")):
                from transformers.image_utils import load_image

                image = load_image(image, timeout=timeout)
            else:
                image = PIL.ImageOps.exif_transpose(PIL.Image.open(image))
        if getattr(image, "ndim", 0) == 4:
            raise ValueError(f"one image per input, got an array of shape {tuple(image.shape)}: pass a list of images")
        return self.image_processor(images=image, return_tensors="pt")  # float32: the model casts what may be cast

    def postprocess(self, model_outputs, function_to_apply=None, top_k=5, drop_class_0=False):
        if function_to_apply is not None:
            results = super().postprocess(model_outputs, function_to_apply=function_to_apply,
                                          top_k=self.model.config.num_labels)
        else:
            scores = model_outputs["scores"][0].float()
            labels = self.model.config.id2label
            results = [{"label": labels[i], "score": s.item()} for i, s in enumerate(scores)]
            results.sort(key=lambda r: r["score"], reverse=True)
        if drop_class_0 and self.model.config.num_labels > 1:
            results = [r for r in results if r["label"] != self.model.config.id2label[0]]
        return results[: min(top_k, len(results))] if top_k is not None else results


__all__ = [
    "CityClassifierForImageClassification",
    "CityClassifierPreTrainedModel",
    "CityClassifierImageClassificationPipeline",
    "CityClassifierOutput",
    "CityClassifierStem",
    "combine_tiles",
    "scatter_tiles",
]
