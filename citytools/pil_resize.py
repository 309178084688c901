"""Pillow's resize, restated in torch for any device, so that a GPU can cut and resize the views
itself with the same bytes as PIL (tests compare them exactly). Pillow resizes 8-bit images in two
passes (horizontal, then vertical), each a weighted sum with integer weights (22 fractional bits)
rounded back to 8 bits.

Not remote code: only classify.py's `--crop-on device` path uses it (`citytools.views`)."""

import functools
import math

import numpy as np
import PIL.Image
import torch

from citytools.remote import to_device

PIL_PRECISION_BITS = 22  # libImaging/Resample.c: 32 - 8 - 2


def _bilinear(x):
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x):  # a = -0.5, evaluated in Pillow's order
    x = np.abs(x)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


PIL_FILTERS = {int(PIL.Image.BILINEAR): (_bilinear, 1.0), int(PIL.Image.BICUBIC): (_bicubic, 2.0)}


@functools.lru_cache(maxsize=512)
def pil_resample_weights(in_size, out_size, resample):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for resizing a whole axis of `in_size`
    pixels to `out_size`: (first source pixel (out,), integer weights (out, taps)), both int64
    (cached: read-only)."""
    kernel, support = PIL_FILTERS[int(resample)]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    x = np.arange(taps)
    used = x[None, :] < count[:, None]
    weights = np.where(used, kernel(((x[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # summed in Pillow's order: the rounding of the total decides some weights
        total = total + weights[:, tap]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PIL_PRECISION_BITS)
    weights = np.trunc(np.where(weights < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int64)
    first.flags.writeable = weights.flags.writeable = False
    return first, weights


_DEVICE_WEIGHTS = {}


def _device_weights(device, in_size, out_size, resample):
    """`pil_resample_weights` as tensors on `device` (int64 first pixels, int32 weights), kept per
    size: a fresh copy from pageable memory would stall the GPU's queue, so it goes through pinned
    memory, without waiting, once per size."""
    key = (str(device), in_size, out_size, int(resample))
    if key not in _DEVICE_WEIGHTS:
        if len(_DEVICE_WEIGHTS) >= 1024:
            _DEVICE_WEIGHTS.pop(next(iter(_DEVICE_WEIGHTS)))
        first, weights = pil_resample_weights(in_size, out_size, resample)
        _DEVICE_WEIGHTS[key] = (to_device(torch.from_numpy(first.astype(np.int64)), device),
                                to_device(torch.from_numpy(weights.astype(np.int32)), device))
    return _DEVICE_WEIGHTS[key]


def _resample_axis(pixels, dim, first, weights, shift):
    """One Pillow pass along `dim` of an int32 tensor: output i sums source pixels first[i] - shift
    onwards times its integer weights, rounds, shifts and clips to 0..255."""
    taps = weights.shape[1]
    index = (first[:, None] - shift + torch.arange(taps, device=pixels.device)).clamp_(max=pixels.shape[dim] - 1)
    shape = [1] * pixels.dim()
    shape[dim] = -1
    total = torch.full((), 1 << (PIL_PRECISION_BITS - 1), dtype=torch.int32, device=pixels.device)
    for tap in range(taps):  # a tap past the edge reads the last pixel with weight 0
        total = total + pixels.index_select(dim, index[:, tap]) * weights[:, tap].view(shape)
    return (total >> PIL_PRECISION_BITS).clamp_(0, 255)


def resize_like_pil(pixels, size, resample, window=None):
    """(..., H, W, 3) uint8 tensor -> the same bytes as PIL's `Image.resize((width, height), resample)`
    for BILINEAR and BICUBIC, or only its `window` (left, top, right, bottom) of the output: each
    output pixel depends on its own row's and column's weights, so a crop costs only its pixels."""
    height, width = pixels.shape[-3], pixels.shape[-2]
    out_width, out_height = size
    left, top, right, bottom = window or (0, 0, out_width, out_height)
    if (out_width, out_height) == (width, height):
        return pixels[..., top:bottom, left:right, :]
    x, start = pixels, 0
    if out_height == height:  # no vertical pass: the window's rows as they are
        x = x[..., top:bottom, :, :]
    else:  # only the source rows the vertical pass reads
        first_y, weights_y = pil_resample_weights(height, out_height, resample)
        start = int(first_y[top:bottom].min())
        x = x[..., start : min(int(first_y[top:bottom].max()) + weights_y.shape[1], height), :, :]
    x = x.to(torch.int32)
    if out_width == width:
        x = x[..., left:right, :]
    else:
        first, weights = _device_weights(pixels.device, width, out_width, resample)
        x = _resample_axis(x, -2, first[left:right], weights[left:right], 0)
    if out_height != height:
        first, weights = _device_weights(pixels.device, height, out_height, resample)
        x = _resample_axis(x, -3, first[top:bottom], weights[top:bottom], start)
    return x.to(torch.uint8)


def device_views_supported(processor):
    """Whether `device_views` can stand in for the processor's `views` + `resize_and_crop`
    (BILINEAR/BICUBIC only, the original's five-crop tiling only)."""
    return (int(processor.resample) in PIL_FILTERS and processor.crop_size["height"] <= processor.size["shortest_edge"]
            and processor.tiling_mode == "five")


def device_views(processor, pixels, tiling=None):
    """(H, W, 3) uint8 torch tensor of an RGB image, on any device -> its views' crops
    (k, crop, crop, 3) uint8 on that device: the same bytes as `processor.resize_and_crop` of each of
    `processor.views(image)`, made where the tensor is (a GPU cuts and resizes, the CPU only decodes)."""
    height, width = pixels.shape[0], pixels.shape[1]
    size, boxes = processor.view_layout(width, height, tiling)
    if len(boxes) > 1:
        resized = resize_like_pil(pixels, size, PIL.Image.BILINEAR)
        views = torch.stack([resized[top:bottom, left:right] for left, top, right, bottom in boxes])
        width = height = boxes[0][2] - boxes[0][0]
    else:
        views = pixels[None]
    size, box = processor.clip_resize(width, height)
    return resize_like_pil(views, size, processor.resample, box)
