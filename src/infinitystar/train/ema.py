"""Exponential moving average of the trained weights (off by default, as in the reference).

``ema = decay * ema + (1 - decay) * param`` after every optimizer step, over parameters only. Under
FSDP2 the parameters are DTensor shards and so are the averages: each rank keeps the average of its
own shard, and the checkpoint stores them sharded next to the model (``"ema"`` in the DCP state).
Names are the model's plain parameter names (activation-checkpoint wrappers stripped), so an export
can load the averages into an unwrapped model.
"""

from __future__ import annotations

import torch
from torch import nn

_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def clean_param_name(name: str) -> str:
    """The plain parameter name of a (possibly activation-checkpoint-wrapped) module's parameter."""
    return name.replace(_WRAPPER_PREFIX, "")


class EMA:
    """Shadow copies of the trainable parameters, updated in place with :meth:`update`."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            clean_param_name(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[clean_param_name(n)].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages themselves (DCP loads into them in place)."""
        return self.shadow
