#!/usr/bin/env python
"""Train an A1111-compatible hypernetwork: `accelerate launch train_hypernetwork.py --help`.

Same training core, data pipeline and outputs as `train_textual_inversion.py`; the work happens
in `tinv_lib.training.hypernetwork`.
"""

import sys

from tinv_lib.common.cpu_waits import prefer_passive_waits

prefer_passive_waits()  # before torch loads: OpenMP reads its wait policy once

from tinv_lib.training.hypernetwork import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
