"""The training-step benchmark behind `benchmarks/bench_train.py`, one concern per module.

* `presets`: the models (built from config at a preset's size) and the training images;
* `variants`: the optimisations under test and how variants are named;
* `jobs`: what one measurement is, as a worker receives it;
* `meters`: step clocks, peak memory, optimizer-state and gradient bytes;
* `floor`: the bare loop our step is judged against;
* `trainer`: our real training core, watched through its hooks, and the pair of it and its floor;
* `workers`: worker processes and the round-robin over them;
* `report`: medians, the table and the acceptance checks.
"""
