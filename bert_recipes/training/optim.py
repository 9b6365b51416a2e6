"""Optimizer and learning-rate schedule from a recipe's ``train`` section.

AdamW with BERT's weight-decay exclusions (no decay on biases and LayerNorm weights, as in
google-research/bert optimization.py), fused (one kernel for all tensors) on every device
where torch has the fused kernel, the CPU included; LAMB (You et al. 2019, used for
BERT-large in 76 minutes) through ``timm`` when installed. The schedule is transformers'
``get_scheduler``: linear warmup, then linear (or cosine) decay to zero at ``total_steps``.
"""

from __future__ import annotations

import torch

from ..errors import UserError

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm", "ln_")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights and undecayed biases / LayerNorm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(key in name for key in NO_DECAY) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train) -> torch.optim.Optimizer:
    """AdamW (default) or LAMB for ``model`` with the recipe's hyperparameters.

    Raises:
        UserError: ``train.optimizer: lamb`` without ``timm`` installed.
    """
    groups = parameter_groups(model, train.weight_decay)
    betas = (train.adam_beta1, train.adam_beta2)
    if train.optimizer == "lamb":
        try:
            from timm.optim import Lamb
        except ImportError:
            raise UserError("train.optimizer: 'lamb' needs the timm package (pip install timm)") from None
        return Lamb(groups, lr=train.learning_rate, betas=betas, eps=train.adam_epsilon)
    params = [p for group in groups for p in group["params"]]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=betas, eps=train.adam_epsilon,
                             fused=fused_adamw_available(params) or None)


def fused_adamw_available(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel supports every parameter (device and dtype).

    The CPU has one since torch 2.4; it is several times faster than the default
    per-tensor loop there (``benchmarks/RESULTS.md``). The optimizer is built before
    Accelerate moves the model, so the parameters may still be on the CPU for a GPU run:
    fused AdamW works on whatever supported device the parameters are on at each step.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older or newer torch without the helper
        devices = {"cuda"}
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def build_scheduler(optimizer: torch.optim.Optimizer, train, total_steps: int):
    """transformers' scheduler: ``train.lr_scheduler_type`` with ``train.warmup_*``."""
    from transformers import get_scheduler

    return get_scheduler(
        train.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=train.warmup_for(total_steps),
        num_training_steps=total_steps,
    )
