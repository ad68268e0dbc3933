"""Data: the procedural shapes dataset with ground-truth masks, and class-folder reading."""

from .shapes import (
    SHAPE_CLASSES,
    ShapeSample,
    ShapesTorchDataset,
    generate_shape,
    mask_path,
    read_mask,
    shape_sample,
    shapes_dataset,
    write_shapes,
)

__all__ = [
    "SHAPE_CLASSES",
    "ShapeSample",
    "ShapesTorchDataset",
    "generate_shape",
    "mask_path",
    "read_mask",
    "shape_sample",
    "shapes_dataset",
    "write_shapes",
]
