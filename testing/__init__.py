"""Scaffolding for tests, benchmarks and recipes: tiny models built from config in code.

Not part of the product (`pyproject.toml` ships only `tinv_lib`): nothing in `tinv_lib` imports
from here. Run from the repository root, where it imports as `testing` (pytest adds the root to
`sys.path`; scripts under `benchmarks/` and `recipes/` put it there in `main()`).

* `tokenizer_build` - a genuine CLIP BPE tokenizer written in code, whose merges make every word
  of `COMMON_WORDS` (the toy world's words, template words) one token;
* `tiny_flow`       - tiny FLUX.1 (dev, schnell) and SD3 pipelines, with a T5 Unigram tokenizer
  built in code;
* `tiny`            - tiny SD1, SD2 (v-prediction) and SDXL pipelines with random weights;
* `evaluation`      - the denoising loss on one fixed batch (same noise and timesteps every time).
"""
