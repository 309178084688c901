"""A classical, non-learned chromatic-aberration detector: how far the red and blue edges sit from
the green ones, in pixels, measured in blocks of each view the model sees.

It is the yardstick every learned model is compared with: a model that cannot beat signal
processing on an artefact this simple is not worth shipping.
"""

import numpy as np
from PIL import Image

from citytools.remote import CityClassifierImageProcessor

MAX_SHIFT = 3  # px searched around each block, after downscaling the view to `work_size`


def gradients(channel):
    """Gradient magnitude of one float channel (central differences)."""
    gx = np.zeros_like(channel)
    gy = np.zeros_like(channel)
    gx[:, 1:-1] = channel[:, 2:] - channel[:, :-2]
    gy[1:-1, :] = channel[2:, :] - channel[:-2, :]
    return np.hypot(gx, gy)


def best_shift(a, b, max_shift=MAX_SHIFT):
    """Integer (dy, dx) maximising the correlation of b shifted against a, refined to sub-pixel."""
    m = max_shift
    core = a[m:-m, m:-m]
    core = core - core.mean()
    scores = np.full((2 * m + 1, 2 * m + 1), -np.inf)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            window = b[m + dy : b.shape[0] - m + dy, m + dx : b.shape[1] - m + dx]
            window = window - window.mean()
            denominator = np.sqrt((core**2).sum() * (window**2).sum()) + 1e-9
            scores[dy + m, dx + m] = (core * window).sum() / denominator
    iy, ix = np.unravel_index(np.argmax(scores), scores.shape)

    def refine(left, centre, right):
        curvature = left - 2 * centre + right
        return 0.0 if curvature >= 0 else 0.5 * (left - right) / curvature

    dy = iy - m + (refine(scores[iy - 1, ix], scores[iy, ix], scores[iy + 1, ix]) if 0 < iy < 2 * m else 0.0)
    dx = ix - m + (refine(scores[iy, ix - 1], scores[iy, ix], scores[iy, ix + 1]) if 0 < ix < 2 * m else 0.0)
    return dy, dx, scores.max()


def fringe_width(view, work_size=336, blocks=4, min_edge=2.0):
    """Estimated red-to-blue fringe width (px at `work_size`) of one RGB PIL view: the 90th
    percentile over edge-rich blocks of |shift(R vs G) - shift(B vs G)|."""
    view = view.resize((work_size, work_size), Image.BILINEAR) if view.size != (work_size, work_size) else view
    pixels = np.asarray(view, dtype=np.float32)
    grads = [gradients(pixels[..., c]) for c in range(3)]
    step = work_size // blocks
    widths = []
    for by in range(blocks):
        for bx in range(blocks):
            box = (slice(by * step, (by + 1) * step), slice(bx * step, (bx + 1) * step))
            r, g, b = (grad[box] for grad in grads)
            if g.mean() < min_edge:  # flat block: nothing to measure
                continue
            ry, rx, _ = best_shift(g, r)
            uy, ux, _ = best_shift(g, b)
            widths.append(np.hypot(ry - uy, rx - ux))
    return float(np.percentile(widths, 90)) if widths else 0.0


class FringeBaseline:
    """Scores images like a class model: {"Pass": p, "Chromatic Aberration": p} per image, where p
    grows with the fringe width of the worst tile (a logistic around `midpoint` px)."""

    labels = ("Pass", "Chromatic Aberration")

    def __init__(self, processor=None, midpoint=0.6, slope=4.0):
        self.processor = processor or CityClassifierImageProcessor()
        self.midpoint, self.slope = midpoint, slope

    def width(self, image):
        views = self.processor.views(image)
        return max(fringe_width(view, self.processor.crop_size["height"]) for view in views)

    def __call__(self, image):
        p = 1 / (1 + np.exp(-self.slope * (self.width(image) - self.midpoint)))
        return {"Pass": float(1 - p), "Chromatic Aberration": float(p)}
