"""Quantization inside a model: the value forward, its gradient backward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_lowp.formats import Format, as_format, check_rounding
from lightning_lowp.functional import quantize

__all__ = ["quantizer", "Quantizer"]

FormatLike = Optional[Format | str]


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, backward, forward_rounding, backward_rounding, generator):
        ctx.backward_args = (backward, backward_rounding, generator)
        return x.view_as(x) if forward is None else quantize(x, forward, forward_rounding, generator)

    @staticmethod
    def backward(ctx, grad):
        fmt, rounding, generator = ctx.backward_args
        grad = grad if fmt is None else quantize(grad, fmt, rounding, generator)
        return grad, None, None, None, None, None


def _formats(forward, backward, forward_rounding, backward_rounding):
    forward = None if forward is None else as_format(forward, "forward")
    backward = None if backward is None else as_format(backward, "backward")
    check_rounding(forward_rounding, "forward_rounding")
    check_rounding(backward_rounding, "backward_rounding")
    return forward, backward


def quantizer(
    forward: FormatLike = None,
    backward: FormatLike = None,
    forward_rounding: str = "nearest",
    backward_rounding: str = "nearest",
    generator: torch.Generator | None = None,
):
    """A function ``f(x)``: x quantized to ``forward`` in the forward pass, and the gradient
    flowing back through it quantized to ``backward``. ``None`` leaves that direction as is.
    """
    forward, backward = _formats(forward, backward, forward_rounding, backward_rounding)

    def quantize_forward_backward(x: torch.Tensor) -> torch.Tensor:
        return _Quantize.apply(x, forward, backward, forward_rounding, backward_rounding, generator)

    return quantize_forward_backward


class Quantizer(nn.Module):
    """:func:`quantizer` as a module, to place between layers."""

    def __init__(
        self,
        forward: FormatLike = None,
        backward: FormatLike = None,
        forward_rounding: str = "nearest",
        backward_rounding: str = "nearest",
    ):
        super().__init__()
        self.forward_format, self.backward_format = _formats(forward, backward, forward_rounding, backward_rounding)
        self.forward_rounding = forward_rounding
        self.backward_rounding = backward_rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Quantize.apply(
            x, self.forward_format, self.backward_format, self.forward_rounding, self.backward_rounding, None
        )

    def extra_repr(self) -> str:
        return (
            f"forward={self.forward_format}, backward={self.backward_format}, "
            f"forward_rounding={self.forward_rounding!r}, backward_rounding={self.backward_rounding!r}"
        )
