#!/usr/bin/env python
"""Train a textual-inversion embedding: `accelerate launch train_textual_inversion.py --help`.

Every A1111 Train-tab feature on Accelerate (multi-GPU, exact resume, SDXL). The work happens in
`tinv_lib.training.textual_inversion`; this script only hands it the command line.
"""

import sys

from tinv_lib.common.cpu_waits import prefer_passive_waits

prefer_passive_waits()  # before torch loads: OpenMP reads its wait policy once

from tinv_lib.training.textual_inversion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
