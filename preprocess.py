#!/usr/bin/env python
"""Prepare a folder of images for embedding / hypernetwork training: A1111's "Preprocess images".

Resizes and crops to the training size, optionally splits oversized images, crops around the
subject, adds mirrored copies and writes captions made by a local image-to-text model (BLIP).
Re-running on the same destination skips finished work. Every option: docs/preprocess.md. The work
happens in `tinv_lib.preprocessing.cli`; this script only hands it the command line.

    python preprocess.py --source_dir raw --dest_dir train --width 512 --height 512 --flip \\
        --caption_model models/blip-image-captioning-base
"""

import sys

from tinv_lib.common.cpu_waits import prefer_passive_waits

prefer_passive_waits()  # before torch loads: OpenMP reads its wait policy once

from tinv_lib.preprocessing.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
