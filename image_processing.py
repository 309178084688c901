"""CityClassifier's image processor: the original's five-crop tiling (or a grid of crops covering the
whole picture at native resolution), then CLIP preprocessing per tile."""

from typing import TypedDict

import numpy as np
import PIL.Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .native_fringes import measure_native, native_feature_names, native_fringe_spec, native_patch_spec
from .tiling import NUM_TILES, TILING_MODES, grid_layout, is_tiled, tile_boxes, tiling_size, view_layout

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NATIVE_RESIZE_MODES = {"1", "P", "L", "LA", "RGB", "RGBA", "CMYK"}  # resized for tiling before conversion


class CityClassifierImageProcessorKwargs(TypedDict, total=False):
    tiling: bool
    tiling_mode: str
    grid_max_tiles: int
    tile_resize_limit: int
    size: dict
    crop_size: dict
    resample: int
    rescale_factor: float
    image_mean: list
    image_std: list
    native_fringes: object
    native_patches: object


def to_rgb(image):
    """Any PIL mode -> RGB, as `Image.convert("RGB")` does, except 16/32-bit integer images, which
    are scaled to 8 bits (convert would clip them to white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257  # 0..65535 -> 0..255
        image = PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def as_pil(image, input_data_format=None):
    """One image as CLIPImageProcessor takes it -> a PIL image with the same pixels.

    PIL images pass through in their own mode. numpy arrays and torch tensors may be (H, W),
    (H, W, C) or (C, H, W) with C in 1, 3, 4 (`input_data_format` "channels_first" / "channels_last"
    settles a doubt; otherwise a leading 1 or 3 means channels first, as transformers infers),
    uint8 or integers in 0..255, or floats in [0, 1] (scaled by 255 and rounded, so `array / 255`
    scores as the uint8 image does)."""
    if isinstance(image, PIL.Image.Image):
        return image
    if type(image).__module__.split(".")[0] == "torch":
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if image.ndim == 3:
        first = image.shape[0] in (1, 3) or (image.shape[0] == 4 and image.shape[-1] not in (1, 3, 4))
        if input_data_format is not None:
            if str(input_data_format) not in ("channels_first", "channels_last", "ChannelDimension.FIRST",
                                              "ChannelDimension.LAST"):
                raise ValueError(f"input_data_format must be channels_first or channels_last, got {input_data_format}")
            first = "first" in str(input_data_format).lower()
        if first:
            image = image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"an image array needs 1, 3 or 4 channels, got shape {tuple(image.shape)}")
        if image.shape[-1] == 1:
            image = image[..., 0]
    elif image.ndim != 2:
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {tuple(image.shape)}"
                         + (" (a batch: pass a list of images)" if image.ndim == 4 else ""))
    if min(image.shape[:2]) < 1:
        raise ValueError(f"an image array needs at least one pixel, got shape {tuple(image.shape)}")
    if image.dtype.kind == "f":
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if not (np.isfinite(image).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(f"float pixels must lie in [0, 1], got values from {low} to {high} "
                             "(pass uint8 for 0..255)")
        image = np.rint(image.astype(np.float64) * 255)
    elif image.dtype.kind in "iu" and image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"{image.dtype} pixels must lie in 0..255, got values from {image.min()} to "
                             f"{image.max()} (pass a PIL image for 16-bit pictures)")
    elif image.dtype != np.uint8:
        raise ValueError(f"image arrays must hold uint8, integers in 0..255 or floats in [0, 1], got {image.dtype}")
    return PIL.Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))  # L, RGB or RGBA by shape


def as_pil_list(images, input_data_format=None):
    """A single image, a batch array (N, ...), or a list of images -> a list of PIL images."""
    if isinstance(images, (list, tuple)):
        return [as_pil(image, input_data_format) for image in images]
    if getattr(images, "ndim", 0) == 4:
        return [as_pil(image, input_data_format) for image in images]
    return [as_pil(images, input_data_format)]


def resize_for_tiling(image, resize_limit):
    """Resizes to `tiling_size` as torchvision's resize does on PIL images (bilinear, antialiased)."""
    size = tiling_size(*image.size, resize_limit)
    return image if size == image.size else image.resize(size, PIL.Image.BILINEAR)


def tile_views(image, crop, resize_limit, tiling=True):
    """The original's views of one RGB image: the whole image, or five (2*crop)-pixel crops."""
    tile = 2 * crop
    if not is_tiled(*image.size, crop, tiling):
        return [image]
    image = resize_for_tiling(image, resize_limit)
    return [image.crop(box) for box in tile_boxes(*image.size, tile)]


def grid_views(image, crop, max_tiles):
    """Grid tiling's views of one RGB image: the whole image, as the original, when it is too small
    to tile; else (2*crop)-pixel tiles covering it at native resolution (see `grid_layout`)."""
    if not is_tiled(*image.size, crop):
        return [image]
    size, boxes = grid_layout(*image.size, 2 * crop, max_tiles)
    image = image if size == image.size else image.resize(size, PIL.Image.BILINEAR)
    return [image.crop(box) for box in boxes]


def to_device(tensor, device):
    """`tensor` on `device`; from the CPU to a GPU through pinned memory, without waiting: a copy from
    pageable memory would first wait until everything queued on the GPU is done."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


_DEVICE_CONSTANTS = {}


def _device_constants(device, *values):
    """Float32 tensors of `values` (lists) on `device`, kept per device (`to_device`: a tensor made
    from a list straight on a GPU would make the host wait for the GPU's queue)."""
    import torch

    key = (str(device), *(tuple(v) for v in values))
    if key not in _DEVICE_CONSTANTS:
        if len(_DEVICE_CONSTANTS) >= 64:
            _DEVICE_CONSTANTS.pop(next(iter(_DEVICE_CONSTANTS)))
        _DEVICE_CONSTANTS[key] = tuple(to_device(torch.tensor(v, dtype=torch.float32), device) for v in values)
    return _DEVICE_CONSTANTS[key]


class CityClassifierImageProcessor(BaseImageProcessor):
    """Turns images into `pixel_values` of shape (batch, tiles, 3, crop, crop) plus a `tile_mask`.

    With tiling on, every image gets 5 tile slots so that images of any size batch together; an
    image too small to tile fills slot 0 and `tile_mask` marks the rest as padding. Each view is
    preprocessed exactly as `CLIPImageProcessor` does (bicubic resize of the short edge, centre
    crop, rescale, normalise, in float32).

    `tiling_mode="grid"` (not the original's) replaces the five crops of a large image by a grid of
    crops covering all of it at native resolution, without the `tile_resize_limit` shrink: up to
    `grid_max_tiles` tiles, scaled down only beyond that; a batch then has as many tile slots as its
    most-tiled image. Fringes of a few pixels in a multi-megapixel picture stay a few pixels wide.

    `native_fringes` (None: off; True or a dict of `native_fringes.NATIVE_FRINGE_DEFAULTS`' keys)
    also measures each picture's colour fringes over all of it at its own resolution and returns
    them as `fringe_values`, for models whose config has the same `native_fringes`. `native_patches`
    (None: off; True or a dict of `native_fringes.NATIVE_PATCH_DEFAULTS`' keys; needs
    `native_fringes`) also cuts its most edge-rich blocks, unresized, as `fringe_patches` (uint8), for
    models with the same `native_patches` (their patch stream).
    """

    model_input_names = ["pixel_values", "tile_mask"]
    valid_kwargs = CityClassifierImageProcessorKwargs

    def __init__(
        self,
        tiling=True,
        tiling_mode="five",
        grid_max_tiles=48,
        tile_resize_limit=1536,
        size=None,
        crop_size=None,
        resample=PIL.Image.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=None,
        image_std=None,
        native_fringes=None,
        native_patches=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.native_fringes = native_fringe_spec(native_fringes)
        self.native_patches = native_patch_spec(native_patches)
        if self.native_patches and not self.native_fringes:
            raise ValueError("native_patches needs native_fringes (the patches are picked at its work size)")
        if self.native_fringes:  # an instance's list: a processor without them hands the model what it did
            self.model_input_names = [*type(self).model_input_names, *self.native_layout()]
        self.tiling = bool(tiling)
        if tiling_mode not in TILING_MODES:
            raise ValueError(f"tiling_mode must be one of {', '.join(TILING_MODES)}, got {tiling_mode!r}")
        self.tiling_mode = tiling_mode
        self.grid_max_tiles = int(grid_max_tiles)
        if self.grid_max_tiles < 4:
            raise ValueError(f"grid_max_tiles must be at least 4, got {grid_max_tiles!r}")
        self.tile_resize_limit = int(tile_resize_limit)
        self.size = dict(size or {"shortest_edge": 336})
        self.crop_size = dict(crop_size or {"height": 336, "width": 336})
        self.resample = int(resample)
        self.rescale_factor = rescale_factor
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)
        if "shortest_edge" not in self.size:
            raise ValueError(f"size must be {{'shortest_edge': int}}, got {self.size}")
        if self.crop_size.get("height") != self.crop_size.get("width"):
            raise ValueError(f"crop_size must be square, got {self.crop_size}")

    def with_options(self, **options):
        """This processor, or a copy with some settings replaced for one call (validated as at __init__)."""
        options = {name: value for name, value in options.items() if value is not None}
        if not options:
            return self
        fields = {"tiling": self.tiling, "tiling_mode": self.tiling_mode, "grid_max_tiles": self.grid_max_tiles,
                  "tile_resize_limit": self.tile_resize_limit, "size": self.size,
                  "crop_size": self.crop_size, "resample": self.resample, "rescale_factor": self.rescale_factor,
                  "image_mean": self.image_mean, "image_std": self.image_std, "native_fringes": self.native_fringes,
                  "native_patches": self.native_patches}
        return type(self)(**{**fields, **options})

    def native_layout(self):
        """The model inputs `native_inputs` gives, in order: name -> (dtype, shape) of one picture's."""
        layout = ({"fringe_values": (np.float32, (len(native_feature_names(self.native_fringes)),))}
                  if self.native_fringes else {})
        if self.native_patches:
            spec = self.native_patches
            layout["fringe_patches"] = (np.uint8, (spec["count"], 3, spec["size"], spec["size"]))
        return layout

    def native_inputs(self, image):
        """What this processor reads of the whole picture at native resolution (up to the settings' work
        size), by name: `fringe_values`, its fringes measured over all of it
        ((len(native_feature_names(self.native_fringes)),) float32: NATIVE_FRINGE_FEATURES, then the
        NATIVE_SIZE_FEATURES when its settings have `size` on), and with `native_patches` on,
        `fringe_patches` ((count, 3, size, size) uint8); {} when `native_fringes` is off. `image` as `preprocess` takes
        one, before any tiling or resize."""
        if not self.native_fringes:
            return {}
        values, patches = measure_native(to_rgb(as_pil(image)), self.native_fringes, self.native_patches)
        return {"fringe_values": values, **({"fringe_patches": patches} if patches is not None else {})}

    def work_pixels(self, width, height, tiling=None):
        """Pixels of the largest image that preprocessing a width x height image makes: the resize
        for tiling, or CLIP's short-edge resize of each view (a 10000x3 strip becomes 1120000x336)."""
        short_edge = self.size["shortest_edge"]
        largest = width * height
        if self.is_tiled(width, height, tiling) and self.tiling_mode == "grid":
            return largest  # tiles are cut from the image as it is, or from a smaller copy
        if self.is_tiled(width, height, tiling):
            tiled = tiling_size(width, height, self.tile_resize_limit)
            largest = max(largest, tiled[0] * tiled[1])
            width = height = 2 * short_edge
        resized = short_edge * int(short_edge * max(width, height) / min(width, height))
        return max(largest, resized)

    def view_layout(self, width, height, tiling=None):
        """Where a width x height picture's views come from: (the size it is resized to before
        cutting, the views' boxes in that size), by this processor's settings (`tiling.view_layout`)."""
        return view_layout(width, height, self.size["shortest_edge"], self.tiling if tiling is None else tiling,
                           self.tiling_mode, self.tile_resize_limit, self.grid_max_tiles)

    def clip_resize(self, width, height):
        """CLIP's preprocessing of a width x height view: (the short-edge resize's size, the centre
        crop's box (left, top, right, bottom) in the resized image)."""
        short_edge, crop = self.size["shortest_edge"], self.crop_size["height"]
        size = (short_edge, int(short_edge * height / width)) if width <= height else \
            (int(short_edge * width / height), short_edge)
        top, left = (size[1] - crop) // 2, (size[0] - crop) // 2
        return size, (left, top, left + crop, top + crop)

    def resize_and_crop(self, view):
        """One RGB PIL view -> (crop, crop, 3) uint8: CLIP's bicubic short-edge resize and centre crop."""
        size, (left, top, right, bottom) = self.clip_resize(*view.size)
        return np.asarray(view.resize(size, self.resample))[top:bottom, left:right]

    def normalize_pixels(self, pixels, out=None):
        """(H, W, 3) uint8 -> (3, H, W) float32, rescaled and normalised in CLIPImageProcessor's order
        (float64 rescale, float32 mean and std), through a 256-entry table per channel: the same
        numbers as computing it per pixel, in a third of the time. `out`: a (3, H, W) float32 array
        to write into, a slot of the batch (see `normalize_views`: writing in place spares a copy of
        every view)."""
        values = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        table = (values[None, :] - np.array(self.image_mean, np.float32)[:, None]) / \
            np.array(self.image_std, np.float32)[:, None]  # (3, 256)
        planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W): take reads it in order
        out = np.empty(planes.shape, np.float32) if out is None else out
        for c in range(3):
            table[c].take(planes[c], out=out[c])
        return out

    def normalize_views(self, crops):
        """[(H, W, 3) uint8 crops] -> (n, 3, H, W) float32, each normalised into its slot (`normalize_pixels`)."""
        views = np.empty((len(crops), 3, *crops[0].shape[:2]), np.float32)
        for crop, out in zip(crops, views):
            self.normalize_pixels(crop, out)
        return views

    def normalize_tensor(self, pixels):
        """(n, H, W, 3) uint8 torch tensor, on any device -> (n, 3, H, W) float32 (channels-last in
        memory), the same numbers as `normalize_pixels`: the decoding workers send uint8 crops, a
        quarter of the bytes, and the device that runs the model normalises them."""
        import torch

        x = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        mean, std = _device_constants(x.device, self.image_mean, self.image_std)
        return ((x - mean) / std).permute(0, 3, 1, 2)  # (n, H, W, 3) -> (n, 3, H, W)

    def clip_preprocess(self, view, out=None):
        """One RGB PIL view -> (3, crop, crop) float32, numerically as CLIPImageProcessor does it
        (written into `out` if given)."""
        return self.normalize_pixels(self.resize_and_crop(view), out)

    def is_tiled(self, width, height, tiling=None):
        """Whether an image of this size is scored as five tiles (`tiling` overrides the saved option)."""
        return is_tiled(width, height, self.size["shortest_edge"], self.tiling if tiling is None else tiling)

    def tile_slots(self, tiling=None):
        """Tile slots per image in `pixel_values`: 5 with tiling, else 1 (grid tiling: at least so many;
        a batch has as many as its most-tiled image)."""
        return NUM_TILES if (self.tiling if tiling is None else tiling) else 1

    def prepare(self, image, tiling=None):
        """One image -> the RGB PIL image its views are cut from. The original resized a tiled image
        above the resize limit in the file's own mode and converted each crop to RGB afterwards, so
        Pillow resized palette and 1-bit images nearest-neighbour, RGBA and LA with premultiplied
        alpha, CMYK in CMYK: done here in that order, for those modes (converting a crop equals
        cropping the converted image). Other modes (16-bit, float) become RGB first (`to_rgb`)."""
        image = as_pil(image)
        if image.mode in NATIVE_RESIZE_MODES and self.is_tiled(*image.size, tiling) and self.tiling_mode == "five":
            image = resize_for_tiling(image, self.tile_resize_limit)
        return to_rgb(image)

    def views(self, image, tiling=None):
        """The RGB PIL views the model sees for one image (1, or 5 when tiled; grid tiling: the grid's)."""
        tiling = self.tiling if tiling is None else tiling
        if tiling and self.tiling_mode == "grid":
            return grid_views(self.prepare(image, tiling), self.size["shortest_edge"], self.grid_max_tiles)
        return tile_views(self.prepare(image, tiling), self.size["shortest_edge"], self.tile_resize_limit, tiling)

    def preprocess(
        self,
        images,
        tiling=None,
        tiling_mode=None,
        grid_max_tiles=None,
        return_tensors=None,
        tile_resize_limit=None,
        size=None,
        crop_size=None,
        resample=None,
        rescale_factor=None,
        image_mean=None,
        image_std=None,
        input_data_format=None,
        data_format=None,
        do_resize=None,
        do_center_crop=None,
        do_rescale=None,
        do_normalize=None,
        do_convert_rgb=None,
        **kwargs,
    ):
        """
        Args:
            images: a PIL image (any mode), a numpy array or torch tensor ((H, W), (H, W, C) or
                (C, H, W); uint8, or floats in [0, 1]), a batch of them (N, ...), or a list.
            tiling, tiling_mode, grid_max_tiles, tile_resize_limit, size, crop_size, resample,
                rescale_factor, image_mean, image_std: override the saved settings for this call.
            input_data_format: "channels_first" or "channels_last" where an array's layout is in doubt.
            do_resize, do_center_crop, do_rescale, do_normalize, do_convert_rgb: accepted as True only
                (the model's numbers need every step); data_format: "channels_first" only.
        Returns:
            `BatchFeature` with `pixel_values` (batch, tiles, 3, crop, crop), tiles = 5 with tiling
            (grid tiling: the most any image has, at least 5) and 1 without, `tile_mask`
            (batch, tiles) int64, and with `native_fringes` on, `fringe_values` (batch,
            len(native_feature_names(native_fringes))) float32: each picture's fringes at native resolution, and
            with `native_patches` on, `fringe_patches` (batch, count, 3, size, size) uint8.
        """
        self._refuse_unsupported(kwargs, data_format, do_resize=do_resize, do_center_crop=do_center_crop,
                                 do_rescale=do_rescale, do_normalize=do_normalize, do_convert_rgb=do_convert_rgb)
        processor = self.with_options(tiling_mode=tiling_mode, grid_max_tiles=grid_max_tiles,
                                      tile_resize_limit=tile_resize_limit, size=size, crop_size=crop_size,
                                      resample=resample, rescale_factor=rescale_factor, image_mean=image_mean,
                                      image_std=image_std)
        images = as_pil_list(images, input_data_format)
        tiling = self.tiling if tiling is None else tiling
        views = [processor.views(image, tiling) for image in images]
        slots = max([processor.tile_slots(tiling)] + [len(v) for v in views])
        crop = processor.crop_size["height"]
        pixel_values = np.zeros((len(images), slots, 3, crop, crop), dtype=np.float32)
        tile_mask = np.zeros((len(images), slots), dtype=np.int64)
        for i, image_views in enumerate(views):
            for t, view in enumerate(image_views):
                processor.clip_preprocess(view, out=pixel_values[i, t])
                tile_mask[i, t] = 1
        data = {"pixel_values": pixel_values, "tile_mask": tile_mask}
        if self.native_fringes:
            native = [self.native_inputs(image) for image in images]
            data.update({name: np.stack([n[name] for n in native]) for name in self.native_layout()})
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _refuse_unsupported(unknown, data_format, **steps):
        """TypeError for unknown arguments; ValueError for a step switched off or channels-last output."""
        unknown = sorted(name for name, value in unknown.items() if value is not None)
        if unknown:
            raise TypeError(f"CityClassifierImageProcessor got unknown argument(s): {', '.join(unknown)}")
        skipped = [name for name, value in steps.items() if value is not None and not value]
        if skipped:
            raise ValueError(f"{', '.join(skipped)}=False is not supported: the model's scores need every step")
        if data_format is not None and str(data_format) not in ("channels_first", "ChannelDimension.FIRST"):
            raise ValueError(f"data_format must be channels_first (pixel_values are (batch, tiles, 3, H, W)), "
                             f"got {data_format}")

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)


__all__ = ["CityClassifierImageProcessor"]
