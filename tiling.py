"""How CityClassifier cuts a picture into views: pure geometry, no torch, no PIL, so that the command
lines can offer the same choices before torch is imported. Remote code: the processor and the
config import it relatively."""

import math

NUM_TILES = 5  # the original's five crops: four corners, then the centre
TILING_MODES = ("five", "grid")
TILE_COMBINES = ("mean", "median", "max", "min")


def tiling_size(width, height, resize_limit):
    """The size tiling works at: above `resize_limit` on the long edge, the SHORT edge becomes
    `resize_limit`, which upscales very wide images (2000x1000 -> 3072x1536), as the released scores do."""
    if max(width, height) <= resize_limit:
        return width, height
    new_long = int(resize_limit * max(width, height) / min(width, height))
    return (resize_limit, new_long) if width <= height else (new_long, resize_limit)


def tile_boxes(width, height, tile):
    """torchvision five_crop's boxes (left, top, right, bottom): four corners, then the centre."""
    top, left = int(round((height - tile) / 2.0)), int(round((width - tile) / 2.0))
    corners = [(0, 0), (width - tile, 0), (0, height - tile), (width - tile, height - tile), (left, top)]
    return [(x, y, x + tile, y + tile) for x, y in corners]


def is_tiled(width, height, crop, tiling=True):
    """The original's rule: with tiling on, an image is cut into tiles when min(w, h) > 2*crop."""
    return bool(tiling) and min(width, height) > 2 * crop


def grid_layout(width, height, tile, max_tiles):
    """Grid tiling of a width x height image: (the size it is cut at, the tiles' boxes). Native size
    when ceil(w / tile) * ceil(h / tile) tiles are at most `max_tiles`, else scaled down until they
    are; the tiles of a row (a column) are spread evenly from edge to edge, overlapping a little, so
    every pixel is in one."""
    def count(w, h):
        return math.ceil(w / tile) * math.ceil(h / tile)

    scale = 1.0
    while count(round(width * scale), round(height * scale)) > max_tiles and min(width, height) * scale > tile:
        scale *= 0.97
    size = (max(tile, round(width * scale)), max(tile, round(height * scale))) if scale < 1 else (width, height)

    def starts(length):
        n = math.ceil(length / tile)
        return [0] if n == 1 else [round(i * (length - tile) / (n - 1)) for i in range(n)]

    return size, [(x, y, x + tile, y + tile) for y in starts(size[1]) for x in starts(size[0])]


def view_layout(width, height, crop, tiling=True, mode="five", resize_limit=1536, max_tiles=48):
    """Where the views of a width x height picture come from: (the size the picture is resized to
    before cutting, the views' boxes (left, top, right, bottom) in that size). Untiled: the whole
    picture, one view. `crop` is CLIP's crop (tiles are 2*crop square)."""
    if not is_tiled(width, height, crop, tiling):
        return (width, height), [(0, 0, width, height)]
    if mode == "grid":
        return grid_layout(width, height, 2 * crop, max_tiles)
    size = tiling_size(width, height, resize_limit)
    return size, tile_boxes(*size, 2 * crop)
