#!/usr/bin/env python
"""Make the README's pictures from runs of the README's own commands (issue 8, acceptance 4).

    python train_textual_inversion.py ... --output_dir output/toy-concept     # the README quickstart
    python benchmarks/quality.py --save_grids output/quality/grids            # before/after images
    python benchmarks/quality.py --model models/toy-xl --only prompts --save_grids output/quality-xl/grids
    python benchmarks/quality.py --model models/toy-flux --only prompts --save_grids output/quality-flux/grids
    python benchmarks/concepts.py --save_grids output/concepts/grids          # the concept suite
    python benchmarks/concepts.py --masks --concepts toy-s05 --save_grids output/concepts/masks-grids
    python recipes/readme_pictures.py                                         # -> docs/images/*.png
    python recipes/readme_pictures.py --pictures concept_edit_masks.png       # only some of them

Nothing here generates an image: it lays out the example datasets, the quickstart's preview
images (in step order) and the first row of each quality-benchmark grid side by side, enlarged
without smoothing so the 64 px pictures stay readable.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: the checkout's packages (importing this module changes nothing)
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import image_grid  # noqa: E402

LABEL_WIDTH = 150


def example_grid(folder: Path, count: int = 8) -> Image.Image:
    """The first `count` training images of an example dataset, in one row."""
    images = [p for p in sorted(folder.glob("*.png")) if not p.stem.endswith("-masklabel")]
    return image_grid([Image.open(p).convert("RGB") for p in images[:count]], columns=count)


def preview_strip(output_dir: Path, name: str) -> Image.Image:
    """`images/<name>-<step>.png` of a training run, in step order, each labelled with its step."""
    found = []
    for path in (output_dir / "images").glob(f"{name}-*.png"):
        match = re.fullmatch(rf"{re.escape(name)}-(\d+)\.png", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise SystemExit(f"error: no previews {output_dir}/images/{name}-<step>.png: run the README quickstart first")
    found.sort()
    tiles = [Image.open(path).convert("RGB") for _, path in found]
    strip = image_grid(tiles, columns=len(tiles), scale=2)
    labelled = Image.new("RGB", (strip.width, strip.height + 16), "white")
    labelled.paste(strip, (0, 16))
    draw = ImageDraw.Draw(labelled)
    for index, (step, _) in enumerate(found):
        draw.text((index * strip.width // len(tiles) + 4, 2), f"step {step}", fill="black")
    return labelled


def first_row(grid_file: Path, columns: int = 8) -> Image.Image:
    """The first row of a quality-benchmark grid (its images are square, `columns` per row)."""
    if not grid_file.is_file():
        raise SystemExit(f"error: {grid_file} is missing: run benchmarks/quality.py --save_grids first")
    grid = Image.open(grid_file).convert("RGB")
    return grid.crop((0, 0, grid.width, grid.width // columns))


def concept_edit_rows(concept: str, unmasked_grids: Path, masked_grids: Path, work_dir: Path) -> Image.Image:
    """A scene concept of the suite: its training images, then the first edit (8 seeds, one prompt)
    with the embedding trained without and with object masks."""
    return labelled_rows([
        (f"{concept}\ntraining images", example_grid(work_dir / concept / "data")),
        ("edit, trained\nwithout masks", first_row(unmasked_grids / concept / "trained-edit.png")),
        ("edit, trained\nwith masks", first_row(masked_grids / concept / "trained-edit.png")),
    ])


def labelled_rows(rows: list[tuple[str, Image.Image]]) -> Image.Image:
    """Rows of pictures stacked, each with its label on the left."""
    width = LABEL_WIDTH + max(row.width for _, row in rows)
    out = Image.new("RGB", (width, sum(row.height for _, row in rows)), "white")
    draw = ImageDraw.Draw(out)
    top = 0
    for label, row in rows:
        out.paste(row, (LABEL_WIDTH, top))
        draw.multiline_text((6, top + row.height // 2 - 12), label, fill="black")
        top += row.height
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart_dir", type=Path, default=ROOT / "output" / "toy-concept")
    parser.add_argument("--quickstart_name", default="toy-concept")
    parser.add_argument("--grids", type=Path, default=ROOT / "output" / "quality" / "grids")
    parser.add_argument("--xl_grids", type=Path, default=ROOT / "output" / "quality-xl" / "grids",
                        help="quality.py --model models/toy-xl --save_grids's folder")
    parser.add_argument("--flux_grids", type=Path, default=ROOT / "output" / "quality-flux" / "grids",
                        help="quality.py --model models/toy-flux --save_grids's folder")
    parser.add_argument("--concept_grids", type=Path, default=ROOT / "output" / "concepts" / "grids")
    parser.add_argument("--mask_grids", type=Path, default=ROOT / "output" / "concepts" / "masks-grids")
    parser.add_argument("--mask_work_dir", type=Path, default=ROOT / "output" / "concepts" / "masks",
                        help="the masked suite run's --work_dir (its training images)")
    parser.add_argument("--mask_concept", default="toy-s05", help="the scene concept shown with and without masks")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--pictures", nargs="+", default=None, help="write only these (file names)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = {
        "examples_concept.png": lambda: example_grid(ROOT / "examples" / "concept"),
        "examples_style_colour_shift.png": lambda: example_grid(ROOT / "examples" / "style_colour_shift"),
        "quickstart_previews.png": lambda: preview_strip(args.quickstart_dir, args.quickstart_name),
        "concept_before_after.png": lambda: labelled_rows([
            ("untrained\n(init text 'triangle')", first_row(args.grids / "concept_untrained.png")),
            ("trained\n(quickstart command)", first_row(args.grids / "concept_trained.png")),
        ]),
        "style_before_after.png": lambda: labelled_rows([
            # the default font has no colon, so the labels spell the multiplier out
            ("colour-shift\nmultiplier 0", first_row(args.grids / "style_0.png")),
            ("colour-shift\nmultiplier 1", first_row(args.grids / "style_1.png")),
        ]),
        "prompt_following.png": lambda: first_row(args.grids / "prompts.png"),
        "sdxl_prompt_following.png": lambda: labelled_rows([
            ("models/toy\n(SD 1.x layout)", first_row(args.grids / "prompts.png")),
            ("models/toy-xl\n(SDXL layout)", first_row(args.xl_grids / "prompts.png")),
        ]),
        "flux_prompt_following.png": lambda: labelled_rows([
            ("models/toy\n(SD 1.x layout)", first_row(args.grids / "prompts.png")),
            ("models/toy-xl\n(SDXL layout)", first_row(args.xl_grids / "prompts.png")),
            ("models/toy-flux\n(FLUX.1 layout)", first_row(args.flux_grids / "prompts.png")),
        ]),
        "concept_edit_masks.png": lambda: concept_edit_rows(args.mask_concept, args.concept_grids, args.mask_grids,
                                                            args.mask_work_dir),
    }
    for name, make in pictures.items():
        if args.pictures and name not in args.pictures:
            continue
        picture = make()
        picture.save(args.out / name, optimize=True)
        print(f"wrote {args.out / name} ({picture.width}x{picture.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
