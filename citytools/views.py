"""The views a model scores, in the form its device wants them: normalised crops cut by the decoding
workers for a CPU, uint8 crops for a GPU, or whole images the GPU cuts itself."""

from dataclasses import dataclass

import numpy as np
import torch

from citytools.pil_resize import device_views, device_views_supported
from citytools.remote import to_device


@dataclass
class DeviceImage:
    """A decoded RGB image (H, W, 3) uint8 whose `views` crops the model's device cuts itself
    (`citytools.pil_resize.device_views`, the same bytes as the CPU's crops)."""

    pixels: np.ndarray
    views: int

    def __len__(self):
        return self.views


def view_tiles(processor, image, tiling, mode):
    """The real tiles of one image, for `collate`, in one of three forms by where the model runs:
    "normalised": (k, 3, S, S) float32, normalised here in the decoding worker, for a CPU (where the
    model's process is the slower side: docs/speed.md); "uint8": (k, S, S, 3) crops, a quarter of
    the bytes, normalised by the GPU; "device": the whole decoded image (`DeviceImage`), resized,
    cut and normalised by the GPU, so that the decoding workers only decode."""
    if mode == "device":
        image = processor.prepare(image, tiling)  # RGB; non-RGB modes already resized, as the original
        pixels = np.asarray(image)  # read-only from Pillow: torch wants to be able to write
        tiled = processor.is_tiled(*image.size, tiling)  # the same answer as before `prepare`'s resize
        return DeviceImage(pixels if pixels.flags.writeable else pixels.copy(),
                           processor.tile_slots(True) if tiled else 1)
    crops = [processor.resize_and_crop(view) for view in processor.views(image, tiling=tiling)]
    return np.stack(crops) if mode == "uint8" else processor.normalize_views(crops)


def crop_mode(device, processors, requested="auto"):
    """Where views are cut: by the decoding workers ("normalised" crops for a CPU, "uint8" for a GPU)
    unless `requested` is "device": the model's device resizes and cuts them from the whole decoded
    image, the same bytes (BILINEAR/BICUBIC processors only; on a CPU too, for tests). Not the GPU
    default: its workers feed more crops, but classify.py as a whole was slower with it on an H100
    (bench/gpu-h100-run3.json, docs/speed.md)."""
    if requested not in ("auto", "workers", "device"):
        raise ValueError(f"crop mode must be auto, workers or device, got {requested!r}")
    if requested == "device":
        if not all(device_views_supported(processor) for processor in processors):
            raise ValueError("cropping on the device needs BILINEAR or BICUBIC resampling, crop <= size and the "
                             "five-crop tiling (not --tiling-mode grid)")
        return "device"
    return "uint8" if device.type == "cuda" else "normalised"


def device_crops(processor, images, tile_mask, device):
    """Whole images from `collate` ("device" mode) -> their views' uint8 crops (n, S, S, 3), cut on
    `device`; `tile_mask` (on the CPU: reading it must not wait for the GPU) says how many views each
    has (5: tiled), as the decoding worker decided."""
    counts = tile_mask.sum(1).tolist()
    return torch.cat([device_views(processor, to_device(image, device), tiling=count > 1)
                      for image, count in zip(images, counts)])


def model_pixels(processor, tiles, tile_mask, device):
    """Tiles from `collate` (a tensor of crops, or a list of whole images with `tile_mask` counting
    their views) -> normalised (n, 3, S, S) float32 pixels on `device`. Never rounded to the model's
    dtype here: the model casts what may be cast (its CLIP tower's input), while the fringe
    measurements and the stem need the exact pixels (bf16 cannot hold one grey level's step)."""
    if isinstance(tiles, list):
        tiles = device_crops(processor, tiles, tile_mask, device)
    tiles = to_device(tiles, device)
    if tiles.dtype == torch.uint8:
        tiles = processor.normalize_tensor(tiles)
    return tiles.float()
