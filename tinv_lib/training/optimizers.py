"""The optimizer of the trainable parameters.

The learning rate is set on the parameter groups before every step by the loop (A1111's
schedule strings), so the optimizer is built with a placeholder rate of 1.0.
"""

from __future__ import annotations

import torch


def build_optimizer(params: list[torch.nn.Parameter], args) -> torch.optim.Optimizer:
    """AdamW with the run's betas, epsilon and weight decay; bitsandbytes' 8-bit AdamW with `--use_8bit_adam`."""
    options = dict(lr=1.0, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                   weight_decay=args.adam_weight_decay)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **options)
    return torch.optim.AdamW(params, **options)
