"""tinv_lib: the shared library behind tinv's scripts.

Textual-inversion embeddings and hypernetworks for Stable Diffusion 1.x, 2.x and SDXL, with the
file formats of AUTOMATIC1111, diffusers, kohya and ComfyUI. Submodules are imported on demand so
that `import tinv_lib` stays cheap (no torch/diffusers import here).
"""

__version__ = "0.1.0"
