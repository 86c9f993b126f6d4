#!/usr/bin/env python
"""txt2img with A1111 prompt semantics, embeddings, hypernetworks and infotext (docs/generate.md).

    python generate.py --prompt "a photo of my-style cat" --steps 20 --sampler "DPM++ 2M Karras" --seed 1
    python generate.py --interactive            # one prompt per line on standard input
    python generate.py --from_infotext outputs/txt2img-images/2024-01-01/00000-1.png

Every flag: `python generate.py --help` and docs/generate.md. The work happens in
`tinv_lib.generation.cli`.
"""

import sys

from tinv_lib.common.cpu_waits import prefer_passive_waits

prefer_passive_waits()  # before torch loads: OpenMP reads its wait policy once

from tinv_lib.generation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
