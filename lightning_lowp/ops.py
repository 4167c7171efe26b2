"""Registers the compiled kernels' fake implementations with torch.library.

The operators themselves (``torch.ops.lowp.quantize`` and ``torch.ops.lowp.quantize_``) are
defined in ``cpp/ops.cpp`` and come into being when ``lightning_lowp._C`` is imported; the
fake (meta) implementations below let ``torch.compile`` trace them without running them.
"""

import torch

from lightning_lowp import _C

BUILT_WITH_CUDA = bool(_C.built_with_cuda)


@torch.library.register_fake("lowp::quantize")
def _quantize_fake(x, kind, params, rounding, generator=None):
    return torch.empty_like(x)


@torch.library.register_fake("lowp::quantize_")
def _quantize_inplace_fake(x, kind, params, rounding, generator=None):
    return None


@torch.library.register_fake("lowp::quantize_foreach_")
def _quantize_foreach_fake(out, x, kind, params, rounding, generator=None):
    return None


def _straight_through(ctx, grad):
    return grad, None, None, None, None


# Rounding has a zero derivative almost everywhere; like every quantization-aware training
# library we let the gradient pass unchanged (the straight-through estimator).
torch.library.register_autograd("lowp::quantize", _straight_through)

quantize = torch.ops.lowp.quantize.default
quantize_ = torch.ops.lowp.quantize_.default
quantize_foreach_ = torch.ops.lowp.quantize_foreach_.default
