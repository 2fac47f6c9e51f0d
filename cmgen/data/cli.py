"""``cmgen data shapes|moving-digits --out DIR ...``: write the embedded synthetic datasets (a bad argument
or an occupied ``--out`` ends in one line, see :mod:`cmgen.cli`)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    p = sub.add_parser("shapes", help="coloured shapes with captions: COCO captions + ImageFolder + attributes")
    p.add_argument("--out", required=True, help="dataset root directory")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shapes", type=int, default=2, help="1..N shapes per image (N <= 9)")
    p.add_argument("--primary-size", default="mixed", choices=("mixed", "large", "huge"),
                   help="size of the class (primary) object: mixed = a lone object small or large at random, "
                        "large = always large, huge = alone in the image, centred, about 3/4 of its side")
    p.add_argument("--val-fraction", type=float, default=0.125, help="share of images in the val split")
    p.add_argument("--captions-per-image", type=int, default=5)
    _common(p)

    p = sub.add_parser("moving-digits", help="sklearn digits moving in 8 directions: mp4 + UCF101/MSR-VTT files")
    p.add_argument("--out", required=True, help="dataset root directory")
    p.add_argument("--num-videos", type=int, default=160)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="direction", choices=("direction", "digit"),
                   help="UCF101 class: motion direction (8 classes) or digit (10 classes)")
    p.add_argument("--digit-size", type=int, default=24, help="side of the upscaled digit in pixels")
    p.add_argument("--speed", type=int, default=2, help="pixels per frame along each moving axis")
    p.add_argument("--clips-per-group", type=int, default=4, help="clips per UCF101 group (gXX)")
    p.add_argument("--test-groups", type=int, default=1, help="groups 1..K of every class are the test split")
    p.add_argument("--captions-per-video", type=int, default=5)
    p.add_argument("--crf", type=int, default=18, help="x264 constant rate factor")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from . import write_moving_digits, write_shapes

    if args.dataset == "shapes":
        info = write_shapes(args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed,
                            max_shapes=args.max_shapes, val_fraction=args.val_fraction,
                            captions_per_image=args.captions_per_image, overwrite=args.overwrite,
                            progress=args.progress, primary_size=args.primary_size)
        counts = info["num_images"]
    elif args.dataset == "moving-digits":
        info = write_moving_digits(args.out, num_videos=args.num_videos, num_frames=args.num_frames,
                                   size=args.size, fps=args.fps, seed=args.seed, label=args.label,
                                   digit_size=args.digit_size, speed=args.speed,
                                   clips_per_group=args.clips_per_group, test_groups=args.test_groups,
                                   captions_per_video=args.captions_per_video, crf=args.crf,
                                   overwrite=args.overwrite, progress=args.progress)
        counts = info["num_videos"]
    else:
        raise ValueError(f"unknown dataset {args.dataset!r}")
    print(f"wrote {args.dataset} to {info['root']}: {json.dumps(counts)}")
    return 0
