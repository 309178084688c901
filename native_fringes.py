"""Colour fringes measured over the whole picture at its own resolution: numpy only, no torch, so the
processor runs it where the pixels are decoded. Remote code (the processor imports it relatively);
`citytools.baseline` scores pictures with it alone, the classical yardstick.

Lateral chromatic aberration moves the red and blue edges away from the green ones (one channel, both
apart, both together against green, radially growing from the centre). The picture (above
`work_side` on its long side: box-downscaled to it) is cut into blocks; in each cell of a
`grid` x `grid` layout the `per_cell` blocks with the most green edges are kept (so corners, where
radial aberration is largest, are always seen); in each, the gradient magnitudes of red and blue
are cross-correlated with green's (DFT, Hann window, normalised) over shifts up to `max_shift` px,
and the peak, refined to a twentieth of a pixel by interpolating the correlation between whole
pixels (from its spectrum), is where red's and blue's edges sit against green's; where the
correlation is flat (edges that all run one way say nothing of a shift along them) the peak nearest
no shift is taken, so rounding, which differs between CPUs, decides nothing. The summaries in
NATIVE_FRINGE_FEATURES describe the picture; `fringe_px` alone is the yardstick's score.
"""

import contextlib
import functools

import numpy as np
import PIL.Image

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # without it numpy's BLAS keeps its own threads
    ThreadpoolController = None

NATIVE_FRINGE_DEFAULTS = {"work_side": 2048, "block": 32, "max_shift": 8, "grid": 4, "per_cell": 8,
                          "min_edge": 0.01, "min_peak": 0.5, "size": False}
NATIVE_PATCH_DEFAULTS = {"count": 32, "size": 32, "channels": 16}
NATIVE_FRINGE_FEATURES = (
    "fringe_px",  # mean over measured blocks of the largest of |red|, |blue|, |red - blue| offsets, px
    "fringe_median",  # its median over the blocks
    "fringe_p90",  # its 90th percentile
    "red_px",  # median |red offset| against green
    "blue_px",  # median |blue offset| against green
    "apart_px",  # median |red - blue|: red and blue moved apart
    "together_px",  # median |red + blue| / 2: green moved against magenta
    "radial_px",  # |median of (red - blue) along the direction from the picture's centre|: radial aberration
    "coherent_px",  # |mean (red - blue) vector|: one shift of the whole picture
    "red_gain",  # median rise of red's correlation with green when red is moved back
    "blue_gain",  # the same for blue
    "edge_share",  # the share of blocks measured
    "scale",  # work size / picture size (1 when measured at native resolution)
)
# With `size` on (native_fringes={"size": true}), how much evidence the summaries above rest on, after them:
NATIVE_SIZE_FEATURES = (
    "long_side",  # the picture's long side at its own resolution, in units of 256 px
    "measured",  # blocks measured, in units of 32 (a 171 x 128 picture has 20 blocks; large ones up to 128)
)


def native_feature_names(spec):
    """The names of the values `measure_native` gives with these settings (a spec as stored), in order."""
    return NATIVE_FRINGE_FEATURES + (NATIVE_SIZE_FEATURES if spec and spec.get("size") else ())


def option_settings(value, defaults, name):
    """An optional feature's settings as a config stores them: None/False -> None (off), True -> the
    `defaults`, a dict -> the defaults updated by it; other values or keys: ValueError naming `name`."""
    if value is None or value is False:
        return None
    spec = dict(defaults)
    if value is not True:
        if not isinstance(value, dict) or set(value) - set(defaults):
            raise ValueError(f"{name} must be true or a dict with keys {sorted(defaults)}, got {value!r}")
        spec.update(value)
    return spec


def native_fringe_spec(value):
    """The measurement's settings as stored (see option_settings), checked (ValueError)."""
    spec = option_settings(value, NATIVE_FRINGE_DEFAULTS, "native_fringes")
    if spec is None:
        return None
    if not isinstance(spec["size"], bool):
        raise ValueError(f"native_fringes size must be true or false, got {spec['size']!r}")
    for name in ("work_side", "block", "max_shift", "grid", "per_cell"):
        spec[name] = int(spec[name])
        if spec[name] < 1:
            raise ValueError(f"native_fringes {name} must be a positive integer, got {spec[name]}")
    if spec["block"] < 8 or spec["max_shift"] * 2 >= spec["block"]:
        raise ValueError(f"native_fringes needs block >= 8 and max_shift < block / 2, got {spec}")
    return spec


def native_patch_spec(value):
    """The native patch stream's settings as stored (see option_settings), checked (ValueError):
    `count` patches of `size` x `size` work-size pixels, read by a CNN `channels` wide."""
    spec = option_settings(value, NATIVE_PATCH_DEFAULTS, "native_patches")
    if spec is None:
        return None
    for name in NATIVE_PATCH_DEFAULTS:
        spec[name] = int(spec[name])
        if spec[name] < 1:
            raise ValueError(f"native_patches {name} must be a positive integer, got {spec[name]}")
    if spec["size"] < 8:
        raise ValueError(f"native_patches needs size >= 8, got {spec['size']}")
    return spec


def work_image(image, work_side):
    """A PIL image (any mode) -> (H, W, 3) uint8 RGB at most `work_side` on its long side (box filter:
    each output pixel the mean of its source pixels, which keeps a fringe's shape), and the scale used.
    Only the measured blocks become floats (`block_gradients`)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    scale = min(1.0, work_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             PIL.Image.BOX)
    return np.asarray(image), scale


def block_edges(channel, rows, cols, b):
    """(rows * b, cols * b) uint8 channel -> (rows, cols) mean L1 gradient magnitude per block, in
    [0, 1] units (central differences, 0 on the border), summed in integers: the whole picture's
    pass, kept light (|a - c| as max - min in uint8, a block's rows added in uint16 where they fit)."""
    values = np.ascontiguousarray(channel)
    height, width = values.shape
    edges = np.zeros((height, width), dtype=np.uint16)
    a, c = values[:, 2:], values[:, :-2]
    np.subtract(np.maximum(a, c), np.minimum(a, c), out=edges[:, 1:-1])
    a, c = values[2:], values[:-2]
    edges[1:-1] += np.maximum(a, c) - np.minimum(a, c)
    rows_dtype = np.uint16 if b * 510 <= np.iinfo(np.uint16).max else np.uint32  # each pixel adds at most 510
    per_row = edges.reshape(rows, b, width).sum(1, dtype=rows_dtype)  # (rows, width): a block's rows
    return per_row.reshape(rows, cols, b).sum(2, dtype=np.int64) / (b * b * 255.0)


def block_gradients(region, block_rows, block_cols, b):
    """The L1 gradient magnitude (central differences, 0 on the region's border rows and columns) of
    the blocks (block_rows[i], block_cols[i]) of side b only -> (k, 3, b, b) float32 in [0, 1] units:
    each block is read with the pixel around it (a slice each, edge-padded at the region's border,
    where the differences that reach outside are zeroed)."""
    height, width = region.shape[:2]
    windows = np.empty((len(block_rows), b + 2, b + 2, region.shape[2]), dtype=region.dtype)
    for i, (row, col) in enumerate(zip(block_rows.tolist(), block_cols.tolist())):
        y0, x0 = row * b - 1, col * b - 1
        if y0 >= 0 and x0 >= 0 and y0 + b + 2 <= height and x0 + b + 2 <= width:
            windows[i] = region[y0 : y0 + b + 2, x0 : x0 + b + 2]
        else:
            ys, xs = np.arange(y0, y0 + b + 2).clip(0, height - 1), np.arange(x0, x0 + b + 2).clip(0, width - 1)
            windows[i] = region[ys[:, None], xs[None, :]]
    if windows.dtype == np.uint8:
        windows = windows.astype(np.float32) * np.float32(1 / 255)
    across = np.abs(windows[:, 1:-1, 2:] - windows[:, 1:-1, :-2])  # (k, b, b, 3)
    down = np.abs(windows[:, 2:, 1:-1] - windows[:, :-2, 1:-1])
    for values, first, size, axis in ((across, block_cols * b, width, 2), (down, block_rows * b, height, 1)):
        for edge in (0, size - 1):  # the region's first and last column (row): no neighbour on one side
            hit = np.nonzero((first <= edge) & (edge < first + b))[0]
            index = [hit, slice(None), slice(None)]
            index[axis] = edge - first[hit]
            values[tuple(index)] = 0
    return (across + down).transpose(0, 3, 1, 2)


def pick_blocks(edge, grid, per_cell, min_edge):
    """(rows, cols) green edge strength per block -> the (row, col) indices of the `per_cell` strongest
    blocks above `min_edge` in each cell of a grid x grid layout: cell by cell (row-major), strongest
    first, ties in row-major order."""
    rows, cols = edge.shape
    cell_cols = min(grid, cols)
    cell_row = np.arange(rows) * min(grid, rows) // rows
    cell_col = np.arange(cols) * cell_cols // cols
    cell = (cell_row[:, None] * cell_cols + cell_col[None, :]).ravel()
    strength = edge.ravel()
    order = np.lexsort((-strength, cell))  # stable: equal strengths keep their row-major order
    sorted_cell = cell[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_cell, sorted_cell)  # place within its cell
    keep = order[(rank < per_cell) & (strength[order] > min_edge)]
    return keep // cols, keep % cols


# Values this close to a block's largest (relative to its largest magnitude) count as equal to it:
# far above float64's rounding (about 1e-15 here), below what the data decides (in the real test
# splits no whole-pixel margin lies between 1e-14 and 1e-8; about two sub-pixel searches in ten thousand
# have one between 1e-14 and 1e-9, and count as ties too).
TIE_TOLERANCE = 1e-9


def nearest_peak(values, offsets):
    """(k, n, n) values over a grid of `offsets` (px, each axis; centre = 0) -> (k,) flat index of the
    largest, ties (within TIE_TOLERANCE) going to the offset nearest the centre, then to the first in
    row-major order. A plateau is common: a block whose edges all run one way correlates equally at
    every shift along them, and pixel art at whole-pixel shifts. A plain argmax would pick the value
    that rounding happened to raise, so the same picture would measure differently with another
    CPU's BLAS kernels (and another offset along the edge is no fringe that the data shows)."""
    flat = values.reshape(len(values), -1)
    top = flat.max(1, keepdims=True)
    tied = flat >= top - TIE_TOLERANCE * np.abs(flat).max(1, keepdims=True)
    grid = np.asarray(offsets, dtype=np.float64)
    distance = (grid[:, None] ** 2 + grid[None, :] ** 2).ravel()
    return np.where(tied, distance, np.inf).argmin(1)  # argmin: the first of equal distances


def integer_peaks(corr, m):
    """(k, 2m+1, 2m+1) correlations (centre = no shift) -> ((k, 2) whole-pixel (dy, dx) of the peak
    (`nearest_peak`), the peak's value, the value at no shift)."""
    k, side = corr.shape[0], 2 * m + 1
    flat = corr.reshape(k, -1)
    index = nearest_peak(corr, tuple(range(-m, m + 1)))
    iy, ix = np.divmod(index, side)
    return np.stack([iy - m, ix - m], 1).astype(np.float64), flat[np.arange(k), index], corr[:, m, m]


SUBPIXEL_STEPS = ((0.25, 3), (0.05, 4))  # (step, steps each way): a coarse then a fine search around the peak


@functools.lru_cache(maxsize=8)
def spectrum_axes(b):
    """The blocks' transform along each axis: frequencies along y (fft bins) and x (rfft bins), the
    weight of each x bin in an inverse (the half spectrum stands for both halves), and the forward
    transforms as matrices (a block's rfft2 is forward_y @ block @ forward_x)."""
    n = np.arange(b)
    freq_y, freq_x = np.fft.fftfreq(b), np.fft.rfftfreq(b)
    weight = np.full(len(freq_x), 2.0)
    weight[0] = 1.0
    if b % 2 == 0:
        weight[-1] = 1.0
    return freq_y, freq_x, weight, np.exp(-2j * np.pi * np.outer(freq_y, n)), np.exp(-2j * np.pi * np.outer(n, freq_x))


def product(a, b):
    """a @ b, stacked over leading axes (numpy's matmul): every matrix product of the measurement
    goes through here (a test rounds it as another CPU's BLAS kernels would)."""
    return np.matmul(a, b)


@functools.lru_cache(maxsize=8)
def forward_x_pairs(b):
    """The x-transform as one real (b, 2 * (b//2 + 1)) matrix whose columns are each bin's real and
    imaginary parts side by side: a real block times it, viewed as complex numbers, is the block's
    transform along x, with no copy."""
    forward_x = spectrum_axes(b)[4]
    pairs = np.empty((b, 2 * forward_x.shape[1]))
    pairs[:, 0::2], pairs[:, 1::2] = forward_x.real, forward_x.imag
    return pairs


def block_spectra(blocks):
    """(..., b, b) real blocks -> their rfft2 (..., b, b//2 + 1), as matrix products (numpy's FFT is
    slow on many small blocks): real along x, complex along y."""
    b = blocks.shape[-1]
    along_x = product(np.ascontiguousarray(blocks), forward_x_pairs(b)).view(np.complex128)
    return product(spectrum_axes(b)[3], along_x)


def real_part_rows(matrix):
    """(..., p, n) complex -> (..., 2p, n) real, each row's real part and minus its imaginary part in
    turn: z (..., p) complex viewed as floats, times it, is the real part of z @ matrix."""
    rows = np.empty((*matrix.shape[:-2], 2 * matrix.shape[-2], matrix.shape[-1]))
    rows[..., 0::2, :], rows[..., 1::2, :] = matrix.real, -matrix.imag
    return rows


@functools.lru_cache(maxsize=16)
def shift_matrices(b, offsets):
    """For shifts `offsets` (a tuple, px) around a centre: (along y (n, b), along x (b2, n), weighted)
    phase matrices of the inverse transform."""
    freq_y, freq_x, weight, _, _ = spectrum_axes(b)
    shifts = np.array(offsets)
    along_x = weight[:, None] * np.exp(2j * np.pi * np.outer(freq_x, shifts))
    return np.exp(2j * np.pi * np.outer(shifts, freq_y)), along_x


def centre_phases(b, centre):
    """The phases that move a spectrum by each block's centre (k, 2) (dy, dx): along y (k, b), along x
    (k, b//2 + 1)."""
    freq_y, freq_x, _, _, _ = spectrum_axes(b)
    return np.exp(2j * np.pi * centre[:, 0:1] * freq_y), np.exp(2j * np.pi * centre[:, 1:2] * freq_x)


def correlation_at(cross, b, phases, offsets):
    """The circular cross-correlation whose half spectrum (rfft2) is `cross` (k, b, b//2 + 1), at the
    shifts centre + offsets (a tuple, px, each axis), the centres given by their `centre_phases` ->
    (k, n, n): the band-limited interpolation of its whole-pixel values. The spectrum is moved by each
    block's centre (None: no move), folded into that block's matrices; then two matrix products,
    along y and, for the real part only, along x."""
    along_y, along_x = shift_matrices(b, offsets)
    if phases is not None:  # each block's move folded into its own matrices, smaller than its spectrum
        along_y, along_x = along_y * phases[0][:, None, :], phases[1][:, :, None] * along_x
    rows = product(along_y, cross)  # (k, n, b//2 + 1): along y, complex
    return product(rows.view(np.float64), real_part_rows(along_x)) / (b * b)  # along x, only the real part


@functools.lru_cache(maxsize=8)
def window_power(b):
    """The Hann window of side b's power spectrum along y (fft bins) and along x (rfft bins)."""
    window = np.hanning(b)
    return np.abs(np.fft.fft(window)) ** 2, np.abs(np.fft.rfft(window)) ** 2


def window_correlation_at(b, phases, offsets):
    """`correlation_at` of the blocks' window's own cross-spectrum (the separable Hann window
    outer(w, w)) at the same shifts -> (k, n, n): one axis at a time (the spectrum is a product)."""
    power_y, power_x = window_power(b)
    along_y, along_x = shift_matrices(b, offsets)
    y = (phases[0] * power_y) @ along_y.T  # (k, n)
    x = (phases[1] * power_x) @ along_x  # (k, n)
    return (y[:, :, None] * x[:, None, :]).real / (b * b)


def subpixel_peaks(cross, b, start):
    """Refines whole-pixel peaks `start` (k, 2) to a twentieth of a pixel: the correlation, divided by
    the window's own (which would pull every peak towards no shift), searched on a coarse then a fine
    grid around the peak (`nearest_peak`: along a plateau the peak stays where it was)."""
    best = start.astype(np.float64)
    for step, steps in SUBPIXEL_STEPS:
        offsets = tuple(float(o) for o in np.arange(-steps, steps + 1) * step)
        phases = centre_phases(b, best)
        values = correlation_at(cross, b, phases, offsets) / window_correlation_at(b, phases, offsets).clip(1e-12)
        iy, ix = np.divmod(nearest_peak(values, offsets), len(offsets))
        best = best + np.stack([np.array(offsets)[iy], np.array(offsets)[ix]], 1)
    return best


def block_grid(pixels, b, grids=None):
    """The picture cut into blocks of side b, centred -> (region, top, left, rows, cols, green's edge
    strength per block (rows, cols)), or None when not one block fits. `grids`: a dict that keeps
    each block size's grid, for a second reader of the same pixels (`measure_native`)."""
    if grids is not None and b in grids:
        return grids[b]
    height, width = pixels.shape[:2]
    rows, cols = height // b, width // b
    grid = None
    if rows and cols:
        top, left = (height - rows * b) // 2, (width - cols * b) // 2
        region = pixels[top : top + rows * b, left : left + cols * b]
        grid = region, top, left, rows, cols, block_edges(region[..., 1], rows, cols, b)  # all of green's
    if grids is not None:
        grids[b] = grid
    return grid


def block_offsets(pixels, spec, grids=None):
    """(H, W, 3) pixels (uint8, or float in [0, 1]) -> per measured block: (red (k, 2) and blue (k, 2) offsets against
    green in px (dy, dx), red's and blue's correlation gain (k,), the blocks' centres (k, 2) (y, x),
    the number of blocks in the picture). `grids`: see `block_grid`."""
    height, width = pixels.shape[:2]
    b = min(spec["block"], max(8, min(height, width) // 2))
    b -= b % 2
    m = min(spec["max_shift"], b // 2 - 1)
    empty = np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros((0, 2))
    grid = block_grid(pixels, b, grids)
    if grid is None:
        return (*empty, 0)
    region, top, left, rows, cols, edge = grid
    picked_rows, picked_cols = pick_blocks(edge, spec["grid"], spec["per_cell"], spec["min_edge"])
    if len(picked_rows) == 0:
        return (*empty, rows * cols)
    # (k, 3, b, b), contiguous: every pass below then reads memory in order
    chosen = np.ascontiguousarray(block_gradients(region, picked_rows, picked_cols, b), dtype=np.float64)
    window = np.hanning(b)
    centred = chosen - chosen.mean((-1, -2), keepdims=True)
    centred *= window[:, None] * window[None, :]
    spectra = block_spectra(centred)
    energy = np.square(centred).sum((-1, -2))  # (k, 3)
    whole_shifts = tuple(float(d) for d in range(-m, m + 1))
    found = []
    for channel in (0, 2):  # c[d] = sum_x channel(x + d) green(x): channel's edges sit d from green's
        cross = spectra[:, channel] * np.conj(spectra[:, 1])
        corr = correlation_at(cross, b, None, whole_shifts)  # (k, 2m + 1, 2m + 1): shifts -m..m
        corr = corr / np.sqrt(energy[:, channel] * energy[:, 1]).clip(1e-12)[:, None, None]
        whole, peak, zero = integer_peaks(corr, m)
        inside = np.all(np.abs(whole) < m, axis=1)  # a peak on the search's border is no peak
        found.append((subpixel_peaks(cross, b, whole), peak, zero, inside))
    (red, red_peak, red_zero, red_inside), (blue, blue_peak, blue_zero, blue_inside) = found
    good = (red_peak > spec["min_peak"]) & (blue_peak > spec["min_peak"]) & red_inside & blue_inside
    centres = np.stack([top + (picked_rows + 0.5) * b, left + (picked_cols + 0.5) * b], 1)
    return (red[good], blue[good], (red_peak - red_zero)[good], (blue_peak - blue_zero)[good], centres[good],
            rows * cols)


def summarise(red, blue, red_gain, blue_gain, centres, blocks, size, scale):
    """Per-block offsets -> the NATIVE_FRINGE_FEATURES of the picture (zeros when nothing was measured)."""
    if len(red) == 0:
        return np.array([0.0] * (len(NATIVE_FRINGE_FEATURES) - 1) + [scale], dtype=np.float32)
    apart = red - blue
    red_len, blue_len, apart_len = (np.linalg.norm(v, axis=1) for v in (red, blue, apart))
    worst = np.maximum(np.maximum(red_len, blue_len), apart_len)
    outward = centres - np.array([size[0] / 2, size[1] / 2])
    outward = outward / np.linalg.norm(outward, axis=1, keepdims=True).clip(1e-9)
    features = [worst.mean(), np.median(worst), np.percentile(worst, 90), np.median(red_len), np.median(blue_len),
                np.median(apart_len), np.median(np.linalg.norm(red + blue, axis=1) / 2),
                abs(np.median((apart * outward).sum(1))), np.linalg.norm(apart.mean(0)),
                np.median(red_gain), np.median(blue_gain), len(red) / max(blocks, 1), scale]
    return np.array(features, dtype=np.float32)


def edge_patches(pixels, spec, patch_spec, grids=None):
    """(H, W, 3) uint8 work pixels -> (count, 3, size, size) uint8: the picture's most edge-rich blocks
    of side `size` (green's edges, as `block_offsets` picks its blocks: the strongest of each cell of
    the `grid` x `grid` layout, so every part of the picture is seen), unresized. Fewer edge-rich
    blocks than `count`: they repeat (the model pools over patches, so a repeat adds no evidence);
    none (a flat picture): zeros. A picture under twice `size` on its short side gives blocks of half
    its short side, scaled up to `size` by repeating pixels. `grids`: see `block_grid`."""
    count, size = patch_spec["count"], patch_spec["size"]
    out = np.zeros((count, 3, size, size), dtype=np.uint8)
    height, width = pixels.shape[:2]
    b = size if min(height, width) >= 2 * size else max(4, min(height, width) // 2)
    grid = block_grid(pixels, b, grids)
    if grid is None:
        return out
    region, _, _, rows, cols, edge = grid
    cells = min(spec["grid"], rows) * min(spec["grid"], cols)
    picked_rows, picked_cols = pick_blocks(edge, spec["grid"], -(-count // cells), spec["min_edge"])
    if len(picked_rows) == 0:
        return out
    strongest = np.argsort(-edge[picked_rows, picked_cols], kind="stable")[:count]
    picked = np.resize(strongest, count)  # cycled when fewer than count
    blocks = region.reshape(rows, b, cols, b, 3)[picked_rows[picked], :, picked_cols[picked]]  # (count, b, b, 3)
    if b != size:
        blocks = blocks.repeat(-(-size // b), 1).repeat(-(-size // b), 2)[:, :size, :size]
    out[:] = blocks.transpose(0, 3, 1, 2)
    return out


@functools.lru_cache(maxsize=1)
def blas_controller():
    return ThreadpoolController() if ThreadpoolController is not None else None


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. The measurement's products are small: more
    threads only spin, and in one process beside a model (the pipeline, the original's loop) they take
    the cores from torch's threads (docs/speed.md). classify.py's decoding workers run on one already."""
    controller = blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


def measure_native(image, spec=None, patch_spec=None):
    """One picture (PIL, any mode) -> (its `measure_fringes` values, its `edge_patches` or None when
    `patch_spec` is None), from one work-size copy of it and, where their block sizes agree, one pass
    over its green edges."""
    spec, grids = native_fringe_spec(True if spec is None else spec), {}
    pixels, scale = work_image(image, spec["work_side"])
    with one_blas_thread():
        *offsets, blocks = block_offsets(pixels, spec, grids)
    values = summarise(*offsets, blocks, pixels.shape[:2], scale)
    if spec["size"]:
        values = np.append(values, np.array([max(image.size) / 256, len(offsets[0]) / 32], dtype=np.float32))
    return values, (edge_patches(pixels, spec, native_patch_spec(patch_spec), grids) if patch_spec else None)


def measure_fringes(image, spec=None):
    """One picture (PIL, any mode) -> (len(native_feature_names(spec)),) float32 measurements; offsets in
    px at the work size (`scale` of the picture's). `spec`: see native_fringe_spec (None: defaults)."""
    return measure_native(image, spec)[0]
