"""Generator-seeded re-initialisation of a model, in place.

DM samples a fresh random network every iteration; instead of building a new module (and seeding the
global RNG from the clock, as the reference does), fastdd keeps one module and calls
:func:`init_parameters` with an explicit ``torch.Generator``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

_LINEAR_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORM_TYPES = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_SQRT5 = math.sqrt(5)


def _fill(param: torch.Tensor, draw: Callable[[torch.Tensor], None], generator: torch.Generator) -> None:
    """Apply ``draw`` (an in-place sampler) to ``param``, sampling on the generator's device.

    The draw is made directly into ``param`` when it is a contiguous float32 tensor on the
    generator's device; otherwise into a contiguous float32 tensor on the generator's device that is
    then copied (and cast) into ``param``. Values therefore depend only on the seed, the shape and the
    parameter order, not on the model's device, dtype or memory format (up to the final rounding).
    """
    if param.device == generator.device and param.dtype == torch.float32 and param.is_contiguous():
        draw(param)
    else:
        tmp = torch.empty(param.shape, dtype=torch.float32, device=generator.device)
        draw(tmp)
        param.copy_(tmp)


@torch.no_grad()
def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every parameter of ``model`` in place with PyTorch's default scheme; returns ``model``.

    Modules are visited in ``model.modules()`` order (registration order) and, per module, the weight
    is drawn before the bias, which is the order in which PyTorch's own constructors draw. Hence
    ``init_parameters(m, torch.Generator().manual_seed(s))`` gives bit-for-bit the parameters that
    ``torch.manual_seed(s)`` followed by constructing ``m`` on the CPU would give.

    - ``Linear`` / ``Conv*``: weight ~ ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-b, b)`` with
      ``b = 1/sqrt(fan_in)``, ``fan_in = in_features`` (``in_channels/groups * kh * kw`` for convs);
      bias ~ ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    - ``GroupNorm`` / ``LayerNorm`` / ``BatchNorm*`` / ``InstanceNorm*``: weight 1, bias 0 (no random
      draw); BatchNorm running statistics reset (mean 0, var 1, ``num_batches_tracked`` 0).
    - Any other module that owns parameters raises ``TypeError`` (nothing is silently left stale).

    Random numbers come only from ``generator`` (the global RNG is neither used nor advanced). The
    model may live on any device: when it differs from ``generator.device`` each tensor is drawn on the
    generator's device and copied over (one small copy per parameter tensor; a CUDA generator for a
    CUDA model avoids the host-to-device copies). Cost: one sampling kernel per Linear/Conv tensor, no
    allocation for contiguous float32 parameters on the generator's device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    for module in model.modules():
        if isinstance(module, _LINEAR_TYPES):
            weight = module.weight
            fan_in = weight[0].numel() if weight.shape[0] else 0
            _fill(weight, lambda t: nn.init.kaiming_uniform_(t, a=_SQRT5, generator=generator), generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                _fill(module.bias, lambda t: t.uniform_(-bound, bound, generator=generator), generator)
        elif isinstance(module, _NORM_TYPES):
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(
                f"init_parameters: no initialisation rule for {type(module).__name__}, which owns parameters"
            )
    return model
