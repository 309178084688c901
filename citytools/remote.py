"""Imports the repo's remote-code files for the tools, as the package `cityclassifier`: the one way
tools reach the model code (`from remote_code import ...`), never `cityclassifier.*` directly.

The remote-code files import each other relatively (`from .configuration_cityclassifier import ...`)
because that is how `trust_remote_code` loads them; a relative import needs a parent package, and
the repo root is not one. Registering the root as the package `cityclassifier` lets the tools use
the very same files, and `save_pretrained` still copies them and writes `auto_map` by file name.
"""

import sys
import types

from citytools.toolkit import ROOT

if "cityclassifier" not in sys.modules:
    _package = types.ModuleType("cityclassifier")
    _package.__path__ = [str(ROOT)]
    sys.modules["cityclassifier"] = _package

from cityclassifier.configuration_cityclassifier import TILE_COMBINES, CityClassifierConfig  # noqa: E402
from cityclassifier.image_processing import (  # noqa: E402
    CityClassifierImageProcessor,
    grid_layout,
    resize_for_tiling,
    resize_like_pil,
    tile_boxes,
    tiling_size,
    to_device,
    to_rgb,
)
from cityclassifier.modeling_cityclassifier import (  # noqa: E402
    CPU_CHUNK_BYTES,
    FRINGE_FEATURES,
    CityClassifierForImageClassification,
    CityClassifierFringe,
    CityClassifierImageClassificationPipeline,
    combine_tiles,
    scatter_tiles,
)

CityClassifierConfig.register_for_auto_class()
CityClassifierForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CityClassifierImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "ROOT",
    "TILE_COMBINES",
    "CityClassifierConfig",
    "CPU_CHUNK_BYTES",
    "FRINGE_FEATURES",
    "CityClassifierForImageClassification",
    "CityClassifierFringe",
    "CityClassifierImageClassificationPipeline",
    "CityClassifierImageProcessor",
    "combine_tiles",
    "grid_layout",
    "resize_for_tiling",
    "resize_like_pil",
    "scatter_tiles",
    "tile_boxes",
    "tiling_size",
    "to_device",
    "to_rgb",
]
