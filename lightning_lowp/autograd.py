"""Quantization inside a model: the value forward, its gradient backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_lowp.formats import Format, FormatLike, as_format, check_rounding
from lightning_lowp.functional import quantize

__all__ = ["quantizer", "Quantizer", "QuantizeFunction", "resolve_formats"]


class QuantizeFunction(torch.autograd.Function):
    """The autograd function behind :func:`quantizer`: quantize the value forward, the gradient backward.

    ``QuantizeFunction.apply(x, forward, backward, forward_rounding, backward_rounding, generator)``
    takes resolved formats (or ``None``) and validated rounding modes; see :func:`resolve_formats`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        forward: Format | None,
        backward: Format | None,
        forward_rounding: str,
        backward_rounding: str,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        ctx.backward_args = (backward, backward_rounding, generator)
        # Without a forward format, a copy: a view of x (or x itself, which autograd also makes
        # a view) could not be modified in place by the next layer (ReLU(inplace=True)).
        return x.clone() if forward is None else quantize(x, forward, forward_rounding, generator)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        fmt, rounding, generator = ctx.backward_args
        grad = grad if fmt is None else quantize(grad, fmt, rounding, generator)
        return grad, None, None, None, None, None


def resolve_formats(
    forward: FormatLike | None, backward: FormatLike | None, forward_rounding: str, backward_rounding: str
) -> tuple[Format | None, Format | None]:
    """Validate a forward/backward pair of formats and rounding modes.

    Returns:
        The two formats as format objects (spec strings parsed), ``None`` kept.

    Raises:
        ValueError: naming the argument (``forward``, ``backward_rounding``, ...) that is wrong.
    """
    forward = None if forward is None else as_format(forward, "forward")
    backward = None if backward is None else as_format(backward, "backward")
    check_rounding(forward_rounding, "forward_rounding")
    check_rounding(backward_rounding, "backward_rounding")
    return forward, backward


def quantizer(
    forward: FormatLike | None = None,
    backward: FormatLike | None = None,
    forward_rounding: str = "nearest",
    backward_rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that quantizes its input forward and the gradient flowing back through it.

    Args:
        forward: the format of the value in the forward pass (``None``: left as is).
        backward: the format of the gradient in the backward pass (``None``: left as is).
        forward_rounding: the rounding mode forward.
        backward_rounding: the rounding mode backward.
        generator: a CPU generator for stochastic rounding (default: torch's default generator).

    Returns:
        ``f(x)``, differentiable.

    Example:
        >>> q = lp.quantizer(forward="fixed(8,6)", backward="bf16", backward_rounding="stochastic")
        >>> y = q(torch.randn(4, requires_grad=True))
    """
    fwd, bwd = resolve_formats(forward, backward, forward_rounding, backward_rounding)

    def quantize_forward_backward(x: torch.Tensor) -> torch.Tensor:
        return QuantizeFunction.apply(x, fwd, bwd, forward_rounding, backward_rounding, generator)

    return quantize_forward_backward


class Quantizer(nn.Module):
    """:func:`quantizer` as a module, to place between layers.

    Args:
        forward: the format of the value in the forward pass (``None``: left as is).
        backward: the format of the gradient in the backward pass (``None``: left as is).
        forward_rounding: the rounding mode forward.
        backward_rounding: the rounding mode backward.
    """

    def __init__(
        self,
        forward: FormatLike | None = None,
        backward: FormatLike | None = None,
        forward_rounding: str = "nearest",
        backward_rounding: str = "nearest",
    ) -> None:
        super().__init__()
        self.forward_format, self.backward_format = resolve_formats(
            forward, backward, forward_rounding, backward_rounding
        )
        self.forward_rounding = forward_rounding
        self.backward_rounding = backward_rounding

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantizeFunction.apply(
            x, self.forward_format, self.backward_format, self.forward_rounding, self.backward_rounding, None
        )

    @override
    def extra_repr(self) -> str:
        return (
            f"forward={self.forward_format}, backward={self.backward_format}, "
            f"forward_rounding={self.forward_rounding!r}, backward_rounding={self.backward_rounding!r}"
        )
