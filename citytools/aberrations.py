"""Chromatic aberration as lenses and post-processing make it: channels moved by sub-pixel
offsets or magnified about the centre, edges replicated so that no coloured border gives it away."""

import math

import numpy as np
from PIL import Image


def transform_channel(channel, coeffs, pad):
    """PIL affine transform (output x, y -> input a*x + b*y + c, d*x + e*y + f) with edges replicated,
    so that no coloured border gives the effect away."""
    a, b, c, d, e, f = coeffs
    padded = Image.fromarray(np.pad(np.asarray(channel), pad, mode="edge"))
    coeffs = (a, b, c + pad - (a + b) * pad, d, e, f + pad - (d + e) * pad)
    moved = padded.transform(padded.size, Image.AFFINE, coeffs, Image.BICUBIC)
    return moved.crop((pad, pad, pad + channel.width, pad + channel.height))


def shift_channel(channel, dx, dy):
    """Moves a channel by a sub-pixel offset."""
    return transform_channel(channel, (1, 0, -dx, 0, 1, -dy), int(math.ceil(max(abs(dx), abs(dy)))) + 2)


def channel_shift(image, rng, strength):
    """Red moves one way, blue the other, by `strength` px each, in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    dx, dy = strength * math.cos(angle), strength * math.sin(angle)
    r, g, b = image.split()
    return Image.merge("RGB", (shift_channel(r, dx, dy), g, shift_channel(b, -dx, -dy)))


def one_channel_shift(image, rng, strength):
    """Only red, or only blue, moves by `strength` px in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    dx, dy = strength * math.cos(angle), strength * math.sin(angle)
    r, g, b = image.split()
    if rng.random() < 0.5:
        return Image.merge("RGB", (shift_channel(r, dx, dy), g, b))
    return Image.merge("RGB", (r, g, shift_channel(b, dx, dy)))


def green_shift(image, rng, strength):
    """Green moves by `strength` px against red and blue (green against magenta fringes)."""
    angle = rng.uniform(0, 2 * math.pi)
    r, g, b = image.split()
    return Image.merge("RGB", (r, shift_channel(g, strength * math.cos(angle), strength * math.sin(angle)), b))


def radial_aberration(image, rng, strength):
    """Lateral aberration: R and B magnified differently about the centre; `strength` px at the corners."""
    w, h = image.size
    k = strength / math.hypot(w / 2, h / 2)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h

    def scaled(channel, s):  # output (x, y) samples input (cx + (x - cx) / s, ...)
        return transform_channel(channel, (1 / s, 0, cx - cx / s, 0, 1 / s, cy - cy / s), int(strength * 1.3) + 2)

    r, g, b = image.split()
    return Image.merge("RGB", (scaled(r, 1 + k), g, scaled(b, 1 - k)))
