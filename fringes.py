"""Colour-fringe measurements for CityClassifier: where the red and blue edges of a picture sit
against green's. Remote code (the model imports it relatively); no parameters, nothing learned."""

import torch
from torch import nn

# The stem and the fringe measurements run a few views at a time on a CPU: a whole batch's temporaries
# would be blocks that glibc takes fresh from the kernel on every call.
CPU_CHUNK_BYTES = 16 * 2**20

FRINGE_FEATURES = (
    "fringe_mean",  # |red shift - blue shift| against green, px, averaged over the edge blocks
    "fringe_max",  # its largest value over the edge blocks
    "fringe_coherent",  # |the average red-minus-blue vector|: large for a shift of the whole view
    "red_shift",  # |red shift| against green, averaged
    "blue_shift",  # |blue shift| against green, averaged
    "red_gain",  # how much red's correlation with green rises when red is moved back, averaged
    "blue_gain",  # the same for blue
    "edge_blocks",  # the share of all blocks with edges enough to measure
)


class CityClassifierFringe(nn.Module):
    """Colour-fringe measurements of each view (the whole picture is measured by `native_fringes.py`), as
    features for the head: the view is cut into blocks; in the `blocks` with most green edges, the
    gradient magnitudes of red and blue are cross-correlated with green's (FFT, Hann-windowed,
    normalised) over shifts up to `max_shift` px, and the peak, refined to sub-pixel by a parabola,
    is where red and blue edges sit against green. Returns the (n, len(FRINGE_FEATURES)) float32
    summaries named in FRINGE_FEATURES. No parameters; not differentiated; float32 whatever the
    model's dtype."""

    def __init__(self, spec):
        super().__init__()
        self.block, self.max_shift, self.min_edge = spec["block"], spec["max_shift"], spec["min_edge"]
        self.measured_blocks = spec["blocks"]

    @torch.no_grad()
    def forward(self, pixel_values):
        with torch.autocast(pixel_values.device.type, enabled=False):
            if pixel_values.device.type != "cpu":
                return self._features(pixel_values.float())
            chunk = max(1, CPU_CHUNK_BYTES // (4 * pixel_values[0].numel()))
            return torch.cat([self._features(views.float()) for views in pixel_values.split(chunk)])

    def _features(self, x):
        n, _, height, width = x.shape
        b = max(4, min(self.block, height, width))
        m = min(self.max_shift, b // 2 - 1)
        rows, cols = height // b, width // b
        top, left = (height - rows * b) // 2, (width - cols * b) // 2
        x = x[..., top : top + rows * b, left : left + cols * b]
        grad = x.new_zeros(n, 3, rows * b, cols * b)  # L1 gradient magnitude, central differences, 0 at the edges
        grad[..., :, 1:-1] = (x[..., :, 2:] - x[..., :, :-2]).abs_()
        grad[..., 1:-1, :] += (x[..., 2:, :] - x[..., :-2, :]).abs_()
        edge = nn.functional.avg_pool2d(grad[:, 1:2], b).flatten(1)  # green's mean gradient per block, row-major
        edge_share = (edge > self.min_edge).float().mean(1)
        # Only the blocks with the most edges are correlated: the measurement's cost stays a few ms a view.
        edge, order = edge.topk(min(self.measured_blocks, rows * cols), dim=1)
        # (n, 3, rows*b, cols*b) viewed as (n, rows, cols, 3, b, b): the chosen blocks, (n, k, 3, b, b)
        grid = grad.view(n, 3, rows, b, cols, b).permute(0, 2, 4, 1, 3, 5)
        blocks = grid[torch.arange(n, device=x.device)[:, None], order // cols, order % cols]
        window = torch.hann_window(b, periodic=False, device=x.device, dtype=x.dtype)
        centred = (blocks - blocks.mean((-1, -2), keepdim=True)) * (window[:, None] * window[None, :])
        spectra = torch.fft.rfft2(centred)
        energy = centred.square().sum((-1, -2))  # (n, blocks, 3)
        shifts = torch.arange(-m, m + 1, device=x.device) % b
        found = []
        for channel in (0, 2):  # red, blue against green: c[d] = sum_x channel(x + d) green(x)
            corr = torch.fft.irfft2(spectra[:, :, channel] * spectra[:, :, 1].conj(), s=(b, b))
            corr = corr[..., shifts[:, None], shifts[None, :]]  # (n, blocks, 2m+1, 2m+1), centre = no shift
            corr = corr / (energy[..., channel] * energy[..., 1]).sqrt().clamp_min(1e-12)[..., None, None]
            found.append(self._peak(corr, m))
        (red, red_peak, red_zero), (blue, blue_peak, blue_zero) = found
        weight = ((edge > self.min_edge) & (red_peak > 0.3) & (blue_peak > 0.3)).float()
        count = weight.sum(1).clamp_min(1)
        fringe = red - blue  # (n, blocks, 2)
        length = fringe.norm(dim=-1)
        features = [
            (length * weight).sum(1) / count,
            (length * weight).amax(1),
            ((fringe * weight[..., None]).sum(1) / count[:, None]).norm(dim=-1),
            (red.norm(dim=-1) * weight).sum(1) / count,
            (blue.norm(dim=-1) * weight).sum(1) / count,
            ((red_peak - red_zero) * weight).sum(1) / count,
            ((blue_peak - blue_zero) * weight).sum(1) / count,
            edge_share,
        ]
        return torch.stack(features, dim=1)  # (n, len(FRINGE_FEATURES))

    @staticmethod
    def _peak(corr, m):
        """(..., 2m+1, 2m+1) correlations -> ((..., 2) sub-pixel (dy, dx) of the peak, its value, the value at 0)."""
        side = 2 * m + 1
        flat = corr.flatten(-2)
        peak, index = flat.max(-1)
        iy, ix = index // side, index % side

        def refine(i, step):  # a parabola through the peak and its neighbours along one axis
            inner = (i > 0) & (i < side - 1)
            left = flat.gather(-1, (index - step * inner.long())[..., None])[..., 0]
            right = flat.gather(-1, (index + step * inner.long())[..., None])[..., 0]
            curvature = left - 2 * peak + right
            offset = torch.where(inner & (curvature < 0), 0.5 * (left - right) / curvature.clamp_max(-1e-12), 0.0)
            return (i - m).float() + offset

        shift = torch.stack([refine(iy, side), refine(ix, 1)], dim=-1)
        return shift, peak, corr[..., m, m]
