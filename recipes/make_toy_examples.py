#!/usr/bin/env python
"""Write the toy world's example datasets (README quickstart): `examples/concept/` (8 images of
one concept for textual inversion) and `examples/style_colour_shift/` (shapes drawn in the next
colour round the palette, captioned with the colour asked for, for a hypernetwork). Deterministic; rerunning rewrites identical files.

    python recipes/make_toy_examples.py [--root examples]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: the checkout's toy_world (importing this module changes nothing)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_world.examples import write_examples  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1] / "examples")
    args = parser.parse_args(argv)
    for name, folder in write_examples(args.root).items():
        print(f"{name}: {folder} ({len(list(folder.glob('*.png')))} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
