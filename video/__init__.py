"""Video: decord/PyAV I/O and clip samplers, benchmark dataset loaders, 3D backbones, VideoMoCo, support-set."""
from .datasets import HMDB51, MSRVTT, UCF101, collate, read_class_ind, read_split_file
from .io import (VideoReadError, dense_clips, num_frames, random_clip_indices, read_frames,
                 uniform_indices)

__all__ = ["read_frames", "num_frames", "VideoReadError", "uniform_indices", "random_clip_indices",
           "dense_clips", "UCF101", "HMDB51", "MSRVTT", "collate", "read_class_ind", "read_split_file"]
