"""CityClassifier's image processor: the original's five-crop tiling, then CLIP preprocessing per tile."""

from typing import TypedDict

import numpy as np
import PIL.Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NUM_TILES = 5


class CityClassifierImageProcessorKwargs(TypedDict, total=False):
    tiling: bool
    tile_resize_limit: int
    size: dict
    crop_size: dict
    resample: int
    rescale_factor: float
    image_mean: list
    image_std: list


def to_rgb(image):
    """Any PIL mode -> RGB, as `Image.convert("RGB")` does, except 16/32-bit integer images, which
    are scaled to 8 bits (convert would clip them to white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257  # 0..65535 -> 0..255
        image = PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def tiling_size(width, height, resize_limit):
    """The size tiling works at: above `resize_limit` on the long edge, the SHORT edge becomes
    `resize_limit`, which upscales very wide images (2000x1000 -> 3072x1536), as the released scores do."""
    if max(width, height) <= resize_limit:
        return width, height
    new_long = int(resize_limit * max(width, height) / min(width, height))
    return (resize_limit, new_long) if width <= height else (new_long, resize_limit)


def resize_for_tiling(image, resize_limit):
    """Resizes to `tiling_size` as torchvision's resize does on PIL images (bilinear, antialiased)."""
    size = tiling_size(*image.size, resize_limit)
    return image if size == image.size else image.resize(size, PIL.Image.BILINEAR)


def tile_boxes(width, height, tile):
    """torchvision five_crop's boxes (left, top, right, bottom): four corners, then the centre."""
    top, left = int(round((height - tile) / 2.0)), int(round((width - tile) / 2.0))
    corners = [(0, 0), (width - tile, 0), (0, height - tile), (width - tile, height - tile), (left, top)]
    return [(x, y, x + tile, y + tile) for x, y in corners]


def is_tiled(width, height, crop, tiling=True):
    """The original's rule: with tiling on, an image is cut into five tiles when min(w, h) > 2*crop."""
    return tiling and min(width, height) > 2 * crop


def tile_views(image, crop, resize_limit, tiling=True):
    """The original's views of one RGB image: the whole image, or five (2*crop)-pixel crops."""
    tile = 2 * crop
    if not is_tiled(*image.size, crop, tiling):
        return [image]
    image = resize_for_tiling(image, resize_limit)
    return [image.crop(box) for box in tile_boxes(*image.size, tile)]


class CityClassifierImageProcessor(BaseImageProcessor):
    """Turns images into `pixel_values` of shape (batch, tiles, 3, crop, crop) plus a `tile_mask`.

    With tiling on, every image gets 5 tile slots so that images of any size batch together; an
    image too small to tile fills slot 0 and `tile_mask` marks the rest as padding. Each view is
    preprocessed exactly as `CLIPImageProcessor` does (bicubic resize of the short edge, centre
    crop, rescale, normalise, in float32).
    """

    model_input_names = ["pixel_values", "tile_mask"]
    valid_kwargs = CityClassifierImageProcessorKwargs

    def __init__(
        self,
        tiling=True,
        tile_resize_limit=1536,
        size=None,
        crop_size=None,
        resample=PIL.Image.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=None,
        image_std=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.tiling = bool(tiling)
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

    def resize_and_crop(self, view):
        """One RGB PIL view -> (crop, crop, 3) uint8: CLIP's bicubic short-edge resize and centre crop."""
        short_edge, crop = self.size["shortest_edge"], self.crop_size["height"]
        w, h = view.size
        size = (short_edge, int(short_edge * h / w)) if w <= h else (int(short_edge * w / h), short_edge)
        view = view.resize(size, self.resample)
        top, left = (size[1] - crop) // 2, (size[0] - crop) // 2
        return np.asarray(view)[top : top + crop, left : left + crop]

    def normalize_pixels(self, pixels):
        """(H, W, 3) uint8 -> (3, H, W) float32, rescaled and normalised in CLIPImageProcessor's order."""
        pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = (pixels - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def clip_preprocess(self, view):
        """One RGB PIL view -> (3, crop, crop) float32, numerically as CLIPImageProcessor does it."""
        return self.normalize_pixels(self.resize_and_crop(view))

    def is_tiled(self, width, height, tiling=None):
        """Whether an image of this size is scored as five tiles (`tiling` overrides the saved option)."""
        return is_tiled(width, height, self.size["shortest_edge"], self.tiling if tiling is None else tiling)

    def tile_slots(self, tiling=None):
        """Tile slots per image in `pixel_values`: 5 with tiling, else 1."""
        return NUM_TILES if (self.tiling if tiling is None else tiling) else 1

    def views(self, image, tiling=None):
        """The RGB PIL views the model sees for one image (1, or 5 when tiled)."""
        if not isinstance(image, PIL.Image.Image):
            image = PIL.Image.fromarray(np.asarray(image))
        tiling = self.tiling if tiling is None else tiling
        return tile_views(to_rgb(image), self.size["shortest_edge"], self.tile_resize_limit, tiling)

    def preprocess(self, images, tiling=None, return_tensors=None, **kwargs):
        """
        Args:
            images: a PIL image (any mode), an (H, W, 3) uint8 array, or a list of them.
            tiling: overrides the saved `tiling` for this call.
        Returns:
            `BatchFeature` with `pixel_values` (batch, tiles, 3, crop, crop), tiles = 5 with tiling
            and 1 without, and `tile_mask` (batch, tiles) int64.
        """
        if isinstance(images, (PIL.Image.Image, np.ndarray)):
            images = [images]
        tiling = self.tiling if tiling is None else tiling
        slots = self.tile_slots(tiling)
        crop = self.crop_size["height"]
        pixel_values = np.zeros((len(images), slots, 3, crop, crop), dtype=np.float32)
        tile_mask = np.zeros((len(images), slots), dtype=np.int64)
        for i, image in enumerate(images):
            for t, view in enumerate(self.views(image, tiling)):
                pixel_values[i, t] = self.clip_preprocess(view)
                tile_mask[i, t] = 1
        return BatchFeature({"pixel_values": pixel_values, "tile_mask": tile_mask}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)


__all__ = ["CityClassifierImageProcessor"]
