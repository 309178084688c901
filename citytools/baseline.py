"""The classical yardstick: a chromatic-aberration detector with nothing learned. It scores a picture
by how far, on average over its edge-rich blocks, the red and blue edges sit from the green ones,
measured over the whole picture at its own resolution (up to a 2048 px long side):
`native_fringes.measure_fringes`'s `fringe_px`.

Every learned model is shown beside it (benchmark.py, per family): a model that cannot beat signal
processing on an artefact this simple is not worth shipping.
"""

import numpy as np

from citytools.remote import NATIVE_FRINGE_FEATURES, measure_fringes

FRINGE_PX = NATIVE_FRINGE_FEATURES.index("fringe_px")


class FringeBaseline:
    """Scores images like a class model: {"Pass": 1 - p, "Chromatic Aberration": p} per image, p a
    logistic of the fringe width in px: 0.5 at `midpoint` px, steeper with `slope`. The defaults put
    0.5 at a pixel and a half, where about 4% of the clean pictures of a real-picture test split
    measure more (docs/benchmark.md)."""

    labels = ("Pass", "Chromatic Aberration")

    def __init__(self, midpoint=1.5, slope=3.0, spec=None):
        self.midpoint, self.slope, self.spec = midpoint, slope, spec

    def width(self, image):
        """The picture's fringe width, px at the measurement's work size."""
        return float(measure_fringes(image, self.spec)[FRINGE_PX])

    def __call__(self, image):
        p = 1 / (1 + np.exp(-self.slope * (self.width(image) - self.midpoint)))
        return {"Pass": float(1 - p), "Chromatic Aberration": float(p)}
