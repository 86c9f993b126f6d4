#!/usr/bin/env python
"""Train an A1111-compatible hypernetwork: `accelerate launch train_hypernetwork.py --help`.

Same training core, data pipeline and outputs as `train_textual_inversion.py`; the work happens
in `tinv_lib.hypernetwork_training`.
"""

import sys

from tinv_lib.hypernetwork_training import main

if __name__ == "__main__":
    sys.exit(main())
