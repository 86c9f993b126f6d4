"""`preprocess.py`: A1111's "Preprocess images" from the command line (docs/preprocess.md).

The flags, grouped as A1111's Preprocess tab, become one `PreprocessOptions`; the work happens in
`tinv_lib.preprocessing.folder.preprocess_folder`. A user error prints one `error:` line and
exits 2, Ctrl-C exits 130 keeping what is finished, success prints a summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinv_lib.common.cli_help import HelpFormatter, mark_required
from tinv_lib.common.config_file import add_config_argument, parse_with_config
from tinv_lib.common.errors import TinvError
from tinv_lib.preprocessing.as_dataset import OUTPUT_FORMATS, write_dataset
from tinv_lib.preprocessing.captioning import EXISTING_CAPTION_ACTIONS, CaptionSettings
from tinv_lib.preprocessing.focal_crop import FocalWeights
from tinv_lib.preprocessing.folder import (
    CAPTION_OUTPUTS,
    PreprocessOptions,
    preprocess_folder,
    validate_options,
)
from tinv_lib.preprocessing.image_ops import AutosizeSettings

REQUIRED = ["source_dir", "dest_dir"]
DESCRIPTION = 'Prepare a folder of images for embedding / hypernetwork training: A1111\'s "Preprocess images".'


def build_parser() -> argparse.ArgumentParser:
    """The `preprocess.py` command line, grouped as A1111's Preprocess tab."""
    parser = argparse.ArgumentParser(prog="preprocess.py", description=DESCRIPTION, formatter_class=HelpFormatter)
    io = parser.add_argument_group("folders and size")
    io.add_argument("--source_dir", help="Folder of source images (not recursive).")
    io.add_argument("--dest_dir", help="Output folder (created; must differ from the source).")
    io.add_argument("--output_format", choices=OUTPUT_FORMATS, default="folder",
                    help="folder: images and .txt captions; dataset: also <dest_dir>/dataset (save_to_disk: image and "
                         "text columns) for the trainers' --dataset_name")
    io.add_argument("--width", type=int, default=512, help="Output width in pixels.")
    io.add_argument("--height", type=int, default=512, help="Output height in pixels.")
    io.add_argument("--keep_original_size", action="store_true", help="Also save each image at its own size.")
    io.add_argument("--flip", action="store_true", help="Add a mirrored copy of every output.")

    split = parser.add_argument_group("split oversized images")
    split.add_argument("--split", action="store_true", help="Cut images much taller/wider than the target into tiles.")
    split.add_argument("--split_threshold", type=float, default=0.5, help="Split when the aspect ratio mismatch is at or below this (0-1).")
    split.add_argument("--split_overlap", type=float, default=0.2, help="Overlap between tiles as a fraction of a tile (0-0.9).")

    focal = parser.add_argument_group("focal point crop (non-square images)")
    focal.add_argument("--focal_crop", action="store_true", help="Crop around the subject instead of the centre.")
    focal.add_argument("--focal_edges_weight", type=float, default=0.5, help="Pull of strong corners/edges.")
    focal.add_argument("--focal_entropy_weight", type=float, default=0.15, help="Pull of the most detailed window.")
    focal.add_argument("--focal_face_weight", type=float, default=0.9, help="Pull of faces (only with --face_model).")
    focal.add_argument("--face_model", default=None, help="Local YuNet face detection .onnx file (needs OpenCV).")

    auto = parser.add_argument_group("auto-sized crop")
    auto.add_argument("--autosize", action="store_true", help="Crop each image to the best size on a 64-px grid.")
    auto.add_argument("--autosize_min_dim", type=int, default=384, help="Smallest width/height considered.")
    auto.add_argument("--autosize_max_dim", type=int, default=768, help="Largest width/height considered.")
    auto.add_argument("--autosize_min_area", type=int, default=64 * 64, help="Smallest area considered.")
    auto.add_argument("--autosize_max_area", type=int, default=640 * 640, help="Largest area considered.")
    auto.add_argument("--autosize_objective", choices=("area", "error"), default="area", help="Maximize area, or minimize aspect error.")
    auto.add_argument("--autosize_threshold", type=float, default=0.1, help="Largest aspect error accepted.")

    cap = parser.add_argument_group("captions")
    cap.add_argument("--caption_model", default=None, help="Local folder of an image-to-text model (e.g. BLIP); none = no captioning.")
    cap.add_argument("--caption_prompt", default="", help="Text the model continues (BLIP: empty).")
    cap.add_argument("--caption_min_tokens", type=int, default=0, help="Least new tokens per caption.")
    cap.add_argument("--caption_max_tokens", type=int, default=48, help="Most new tokens per caption.")
    cap.add_argument("--caption_device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    cap.add_argument("--existing_caption", choices=EXISTING_CAPTION_ACTIONS, default="ignore", help="What to do with a source's <stem>.txt caption.")
    cap.add_argument("--caption_output", choices=CAPTION_OUTPUTS, default="txt", help="Write captions as .txt sidecars or into the file names.")

    run = parser.add_argument_group("run")
    run.add_argument("--num_proc", type=int, default=1, help="Worker processes (datasets.map num_proc).")
    run.add_argument("--batch_size", type=int, default=8, help="Source images per map batch (captioned together).")
    add_config_argument(parser)
    mark_required(parser, REQUIRED)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (and `--config`), checked before any file is read or model loaded."""
    return parse_with_config(build_parser(), argv, REQUIRED, lambda args: validate_options(options_from_args(args)))


def options_from_args(args: argparse.Namespace) -> PreprocessOptions:
    """Turn the flat command line into the library's option objects."""
    caption = None
    if args.caption_model:
        caption = CaptionSettings(
            model=args.caption_model,
            prompt=args.caption_prompt,
            min_tokens=args.caption_min_tokens,
            max_tokens=args.caption_max_tokens,
            device=args.caption_device,
        )
    return PreprocessOptions(
        source_dir=args.source_dir,
        dest_dir=args.dest_dir,
        width=args.width,
        height=args.height,
        existing_caption=args.existing_caption,
        keep_original_size=args.keep_original_size,
        flip=args.flip,
        split=args.split,
        split_threshold=args.split_threshold,
        split_overlap=args.split_overlap,
        focal_crop=args.focal_crop,
        focal_weights=FocalWeights(args.focal_edges_weight, args.focal_entropy_weight, args.focal_face_weight),
        face_model=args.face_model,
        autosize=args.autosize,
        autosize_settings=AutosizeSettings(
            args.autosize_min_dim,
            args.autosize_max_dim,
            args.autosize_min_area,
            args.autosize_max_area,
            args.autosize_objective,
            args.autosize_threshold,
        ),
        caption=caption,
        caption_output=args.caption_output,
        num_proc=args.num_proc,
        batch_size=args.batch_size,
    )


def main(argv: list[str] | None = None) -> int:
    """Run preprocessing; user errors print one line and exit 2."""
    try:
        args = parse_args(argv)
        summary = preprocess_folder(options_from_args(args))
    except TinvError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished sources are kept; run again to continue", file=sys.stderr)
        return 130
    for line in summary.skip_lines():
        print(line)
    print(summary.line())
    if args.output_format == "dataset":
        return _write_dataset(Path(args.dest_dir))
    return 0


def _write_dataset(dest_dir: Path) -> int:
    """`--output_format dataset`, after the folder is complete."""
    try:
        target = write_dataset(dest_dir)
    except TinvError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"dataset: {target} (train with --dataset_name {target})")
    return 0

