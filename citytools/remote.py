"""Imports the repo's remote-code files for the tools, as the package `cityclassifier`: the one way
tools reach the model code (`from citytools.remote import ...`), never `cityclassifier.*` directly,
and `citytools.tiling` for the torch-free geometry (argument parsers).

The remote-code files import each other relatively (`from .configuration_cityclassifier import ...`)
because that is how `trust_remote_code` loads them; a relative import needs a parent package, and
the repo root is not one. Registering the root as the package `cityclassifier` lets the tools use
the very same files, and `save_pretrained` still copies them and writes `auto_map` by file name.
"""

from cityclassifier.configuration_cityclassifier import CityClassifierConfig  # registered by citytools/__init__
from cityclassifier.fringes import CPU_CHUNK_BYTES, FRINGE_FEATURES, CityClassifierFringe
from cityclassifier.image_processing import (
    CityClassifierImageProcessor,
    resize_for_tiling,
    to_device,
    to_rgb,
)
from cityclassifier.modeling_cityclassifier import (
    CityClassifierForImageClassification,
    CityClassifierImageClassificationPipeline,
    CityClassifierPatchStream,
    combine_tiles,
    scatter_tiles,
)
from cityclassifier.native_fringes import NATIVE_FRINGE_FEATURES, measure_fringes, measure_native, native_patch_spec

CityClassifierConfig.register_for_auto_class()
CityClassifierForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CityClassifierImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CityClassifierConfig",
    "CPU_CHUNK_BYTES",
    "FRINGE_FEATURES",
    "NATIVE_FRINGE_FEATURES",
    "measure_fringes",
    "measure_native",
    "native_patch_spec",
    "CityClassifierPatchStream",
    "CityClassifierForImageClassification",
    "CityClassifierFringe",
    "CityClassifierImageClassificationPipeline",
    "CityClassifierImageProcessor",
    "combine_tiles",
    "resize_for_tiling",
    "scatter_tiles",
    "to_device",
    "to_rgb",
]
