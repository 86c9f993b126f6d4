#!/usr/bin/env python
"""Train an A1111-compatible hypernetwork: `accelerate launch train_hypernetwork.py --help`.

Same training core, data pipeline and outputs as `train_textual_inversion.py`; the work happens
in `tinv_lib.training.hypernetwork`.
"""

import sys

from tinv_lib.training.hypernetwork import main

if __name__ == "__main__":
    sys.exit(main())
