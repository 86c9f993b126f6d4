"""The toy world: procedurally drawn shapes with captions, a small SD-1.x-layout model that knows
them, and a judge that says what an image shows.

Real Stable Diffusion weights cannot be fetched here and a random tiny model draws noise, so the
project makes a world small enough to learn on a CPU and knows the ground truth of every image in
it. Modules, one idea each:

* `world`      - the vocabulary (shapes, colours, backgrounds, styles), scenes and their captions;
* `draw`       - drawing a scene as a 64 px RGB image;
* `data`       - deterministic batches of scenes/images, and the example datasets;
* `autoencoder`, `diffusion`, `judge` - the three trained parts and their training loops;
* `scoring`    - judging generated images against a target;
* `recipe`     - the whole pretraining run (used by `recipes/pretrain_toy_model.py`).
"""
