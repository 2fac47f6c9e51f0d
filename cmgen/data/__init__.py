"""Embedded synthetic datasets, written in real benchmark formats (see design.md "Embedded default data").

- :func:`write_shapes`: coloured shapes, COCO-captions JSON + ImageFolder + attributes.
- :func:`write_moving_digits`: sklearn digits moving in 8 directions, H.264 mp4 with UCF101 split files
  and MSR-VTT caption files.
"""
from .common import GENERATE_MODES, embedded_data_dir, ensure_dataset, prepare_embedded_data, writer_config
from .moving_digits import DIRECTIONS, write_moving_digits
from .shapes import COLOURS, POSITIONS, SHAPES, SIZES, render_shapes, write_shapes
from .video_io import h264_encoder, write_mp4

__all__ = ["ensure_dataset", "prepare_embedded_data", "embedded_data_dir", "writer_config", "GENERATE_MODES",
           "write_shapes", "render_shapes", "SHAPES", "COLOURS", "SIZES", "POSITIONS",
           "write_moving_digits", "DIRECTIONS", "write_mp4", "h264_encoder"]
