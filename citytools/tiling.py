"""The remote code's view geometry and tiling choices (`tiling.py` at the repo root), for the tools:
torch-free, so an argument parser can offer the model's own choices before torch is imported."""

from cityclassifier.tiling import NUM_TILES, TILE_COMBINES, TILING_MODES, grid_layout, view_layout

__all__ = ["NUM_TILES", "TILE_COMBINES", "TILING_MODES", "grid_layout", "view_layout"]
