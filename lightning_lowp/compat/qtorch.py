"""QPyTorch's API on lightning_lowp's kernels.

Code written for QPyTorch runs after changing its imports::

    from qtorch.quant import Quantizer, quantizer, fixed_point_quantize, float_quantize, block_quantize
    from qtorch.optim import OptimLP
    from qtorch import FixedPoint, FloatingPoint, BlockFloatingPoint

becomes::

    from lightning_lowp.compat.qtorch import (Quantizer, quantizer, fixed_point_quantize,
        float_quantize, block_quantize, OptimLP, FixedPoint, FloatingPoint, BlockFloatingPoint)

The names, argument names, defaults (``"stochastic"`` rounding) and semantics are QPyTorch's
(``qtorch/number.py``, ``qtorch/quant/quant_function.py``, ``qtorch/optim/optim_low.py``); the
arithmetic is lightning_lowp's (``lightning_lowp.quantize``), correctly rounded:

* ``FloatingPoint(exp, man)`` (exp 1..7) is ``lightning_lowp.FloatingPoint(exp, man,
  subnormals=True, specials="none", overflow="saturate")``, QPyTorch's format: bias
  2^(exp-1)-1, smallest normal exponent 2-2^(exp-1), IEEE subnormals, and every exponent code
  a number (no Inf or NaN codes), so the largest value is (2-2^-man)*2^(2^(exp-1)) - 131008 for
  exp=5, man=10, not IEEE half's 65504. Results past it and +-Inf saturate to +-max.
  ``FloatingPoint(8, man)`` is ``lightning_lowp.FloatingPoint(8, man, subnormals=True,
  specials="ieee", overflow="inf")``: QPyTorch's top binade would be [2^128, 2^129), past
  float32, and its float32 kernels never clamp at exp=8 (the exponent code that would be clamped
  is float32's Inf), so a result past (2-2^-man)*2^127 is +-Inf and +-Inf stays +-Inf, as there.
  ``"nearest"`` rounds ties away from zero (QPyTorch adds half an ulp to the magnitude bits and
  truncates).
* ``FixedPoint(wl, fl, clamp, symmetric)`` and ``BlockFloatingPoint(wl, dim)`` are
  lightning_lowp's formats of the same names. QPyTorch rounds them to nearest with ties toward
  +inf (``floor(x*2^fl + 0.5)``; block floating point adds half a step to the positive word
  ``x + 1.5*2^(E+2)``), after a float32 addition that can itself round. lightning_lowp has no
  ties-toward-+inf mode; ``"nearest"`` maps to ``"nearest_away"``, the same rule for every x >= 0
  (ReLU activations, all positive data); a negative exact tie rounds away from zero here and
  toward zero in QPyTorch's CPU kernels. (QPyTorch's CUDA fixed-point kernel computes
  ``nearbyint(x*2^fl + 0.5 - 0.5)``, ties to even: ``Number.nearest`` is the one place to change.)
* ``"stochastic"`` is lightning_lowp's stochastic rounding for every format: reproducible under
  ``torch.manual_seed`` (QPyTorch's CPU float and block kernels draw from a ``std::mt19937``
  seeded by ``std::random_device``, which no seed reaches).

Where QPyTorch's float32 bit tricks double-round, the result here is the correctly rounded one;
NaN stays NaN (QPyTorch's floats with exp < 8 turn it into +-max), zero keeps its sign, a
block's exponent comes from its largest *finite* magnitude (QPyTorch: a block holding Inf or
NaN becomes NaN; its CPU kernel with ``dim >= 0`` takes |max x| rather than max |x|, so a block
whose largest magnitude is negative gets too small an exponent and is clipped; a block maximum
of 2^126 or more overflows its float32 ``6*2^E`` to NaN), and ``BlockFloatingPoint(1)`` gives
zeros (QPyTorch: 0 or +-2^E).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast, overload

import torch
from torch import nn
from torch.optim import SGD, Adam, Optimizer
from typing_extensions import override

from lightning_lowp import formats as _lp
from lightning_lowp.functional import quantize as _quantize

__all__ = [
    "Number",
    "FixedPoint",
    "FloatingPoint",
    "BlockFloatingPoint",
    "quantizer",
    "Quantizer",
    "OptimLP",
    "fixed_point_quantize",
    "float_quantize",
    "block_quantize",
    "ROUNDINGS",
]

#: QPyTorch's rounding names.
ROUNDINGS = ("stochastic", "nearest")


def _check_rounding(rounding: str, argument: str = "rounding") -> str:
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"{argument}={rounding!r} is not a QPyTorch rounding; accepted: {', '.join(ROUNDINGS)}")
    return rounding


# ---- number formats ----------------------------------------------------------------------


class Number:
    """Base of the number formats (QPyTorch's ``qtorch.Number``).

    ``to_lowp()`` is the equivalent lightning_lowp format and ``rounding(r)`` the lightning_lowp
    rounding mode QPyTorch's rounding ``r`` ("nearest" or "stochastic") maps to.
    """

    _fields: tuple[str, ...] = ()
    #: the lightning_lowp mode QPyTorch's "nearest" maps to for this kind of number
    nearest: str = "nearest_away"

    def to_lowp(self) -> _lp.Format:
        """The equivalent lightning_lowp format.

        Raises:
            ValueError: if the number's parameters are out of range.
        """
        raise NotImplementedError

    def rounding(self, rounding: str, argument: str = "rounding") -> str:
        """The lightning_lowp rounding mode QPyTorch's ``rounding`` maps to for this number.

        Args:
            rounding: ``"nearest"`` or ``"stochastic"``.
            argument: the argument name an error message gives.

        Returns:
            :attr:`nearest` for ``"nearest"``, ``"stochastic"`` for ``"stochastic"``.

        Raises:
            ValueError: if ``rounding`` is not one of QPyTorch's roundings.
        """
        return self.nearest if _check_rounding(rounding, argument) == "nearest" else "stochastic"

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Number) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self._values()))


class FixedPoint(Number):
    """QPyTorch's ``FixedPoint(wl, fl, clamp=True, symmetric=False)``.

    Multiples of 2^-fl in [-2^(wl-fl-1), 2^(wl-fl-1) - 2^-fl] (``symmetric``: from
    -2^(wl-fl-1) + 2^-fl); ``clamp=False`` keeps the grid only.

    Args:
        wl: word length, 1..25 (float32 holds every such value exactly).
        fl: fractional length.
        clamp: saturate to the range; ``False`` keeps the grid only.
        symmetric: the range starts at -2^(wl-fl-1) + 2^-fl.

    Raises:
        ValueError: if an argument is out of range.
    """

    _fields = ("wl", "fl", "clamp", "symmetric")

    def __init__(self, wl: int, fl: int, clamp: bool = True, symmetric: bool = False) -> None:
        self.wl, self.fl, self.clamp, self.symmetric = wl, fl, clamp, symmetric
        self.to_lowp()  # validates

    @override
    def to_lowp(self) -> _lp.FixedPoint:
        return _lp.FixedPoint(self.wl, self.fl, clamp=self.clamp, symmetric=self.symmetric)

    def __repr__(self) -> str:
        return f"FixedPoint (wl={self.wl}, fl={self.fl})"

    __str__ = __repr__


class FloatingPoint(Number):
    """QPyTorch's ``FloatingPoint(exp, man)``.

    Bias 2^(exp-1)-1, smallest normal exponent 2-2^(exp-1), IEEE subnormals, and no Inf/NaN
    codes: every exponent code is a number, so the largest value is (2-2^-man)*2^(2^(exp-1));
    results past it and +-Inf saturate to +-max. ``exp=8`` is float32's exponent range, where
    QPyTorch's float32 kernels cannot hold that top binade: a result past (2-2^-man)*2^127 is
    +-Inf there and here.

    Args:
        exp: exponent bits, 1..8.
        man: mantissa bits, 0..23.

    Raises:
        ValueError: if an argument is out of range.
    """

    _fields = ("exp", "man")

    def __init__(self, exp: int, man: int) -> None:
        self.exp, self.man = exp, man
        self.to_lowp()  # validates

    @override
    def to_lowp(self) -> _lp.FloatingPoint:
        _lp.check_int("exp", self.exp, 1, 8)
        if self.exp == 8:
            # QPyTorch's clip_exponent clamps at exponent code 2^(exp-1)+127 = 255, float32's
            # Inf/NaN code, which no rounded float32 exceeds: float32's overflow to Inf is all.
            return _lp.FloatingPoint(8, self.man, subnormals=True, specials="ieee", overflow="inf")
        return _lp.FloatingPoint(self.exp, self.man, subnormals=True, specials="none", overflow="saturate")

    def __repr__(self) -> str:
        return f"FloatingPoint (exponent={self.exp}, mantissa={self.man})"

    __str__ = __repr__


class BlockFloatingPoint(Number):
    """QPyTorch's ``BlockFloatingPoint(wl, dim=-1)``.

    Each block shares the exponent E = floor(log2 max|x|) of its largest finite magnitude and
    holds multiples of 2^(E-wl+2) up to +-(2^(E+1) - 2^(E-wl+2)).

    Args:
        wl: word length, 1..25.
        dim: ``-1``: the whole tensor is one block; ``d >= 0``: one exponent per index along d.

    Raises:
        ValueError: if an argument is out of range.
    """

    _fields = ("wl", "dim")

    def __init__(self, wl: int, dim: int = -1) -> None:
        self.wl, self.dim = wl, dim
        self.to_lowp()  # validates

    @override
    def to_lowp(self) -> _lp.BlockFloatingPoint:
        fmt = _lp.BlockFloatingPoint(self.wl, dim=self.dim)
        if self.dim < -1:
            raise ValueError(f"dim={self.dim} is out of range; accepted: -1 (the whole tensor is one block) or >= 0")
        return fmt

    def __repr__(self) -> str:
        return f"BlockFloatingPoint (wl={self.wl}, dim={self.dim})"

    __str__ = __repr__


def _check_number(number: object, argument: str) -> Number | None:
    if number is not None and not isinstance(number, Number):
        raise ValueError(
            f"{argument} must be a FixedPoint, FloatingPoint or BlockFloatingPoint (from "
            f"lightning_lowp.compat.qtorch) or None, got {number!r}"
        )
    return number


# ---- functions -----------------------------------------------------------------------------


def fixed_point_quantize(
    x: torch.Tensor, wl: int, fl: int, clamp: bool = True, symmetric: bool = False, rounding: str = "stochastic"
) -> torch.Tensor:
    """``x`` rounded to ``FixedPoint(wl, fl, clamp, symmetric)``; a new tensor of x's shape and dtype.

    Args:
        x: the tensor to round.
        wl: word length (see :class:`FixedPoint`).
        fl: fractional length.
        clamp: saturate to the range; ``False`` keeps the grid only.
        symmetric: the range starts at -2^(wl-fl-1) + 2^-fl.
        rounding: ``"stochastic"`` or ``"nearest"`` (QPyTorch's roundings).

    Returns:
        The rounded tensor.
    """
    number = FixedPoint(wl, fl, clamp, symmetric)
    return _quantize(x, number.to_lowp(), number.rounding(rounding))


def float_quantize(x: torch.Tensor, exp: int, man: int, rounding: str = "stochastic") -> torch.Tensor:
    """``x`` rounded to ``FloatingPoint(exp, man)``; a new tensor of x's shape and dtype.

    Args:
        x: the tensor to round.
        exp: exponent bits (see :class:`FloatingPoint`).
        man: mantissa bits.
        rounding: ``"stochastic"`` or ``"nearest"`` (QPyTorch's roundings).

    Returns:
        The rounded tensor.
    """
    number = FloatingPoint(exp, man)
    return _quantize(x, number.to_lowp(), number.rounding(rounding))


def block_quantize(x: torch.Tensor, wl: int, dim: int = -1, rounding: str = "stochastic") -> torch.Tensor:
    """``x`` rounded to ``BlockFloatingPoint(wl, dim)``; a new tensor of x's shape and dtype.

    Args:
        x: the tensor to round.
        wl: word length (see :class:`BlockFloatingPoint`).
        dim: ``-1``: the whole tensor is one block; ``d >= 0``: one exponent per index along d.
        rounding: ``"stochastic"`` or ``"nearest"`` (QPyTorch's roundings).

    Returns:
        The rounded tensor.
    """
    number = BlockFloatingPoint(wl, dim)
    return _quantize(x, number.to_lowp(), number.rounding(rounding))


def _fixed_with_mask(x: torch.Tensor, number: FixedPoint, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped fixed-point rounding and the mask of the elements whose rounded value was outside the range.

    QPyTorch's ``fixed_point_quantize_*_mask``.
    """
    fmt = number.to_lowp()
    q = _quantize(x.float(), dataclasses.replace(fmt, clamp=False), rounding)
    clamped = dataclasses.replace(fmt, clamp=True)
    lo, hi = clamped.min_value, clamped.max_value
    mask = (q > hi) | (q < lo)
    return q.clamp(lo, hi).to(x.dtype), mask


@dataclasses.dataclass(frozen=True)
class _Spec:
    forward: Number | None
    backward: Number | None
    forward_rounding: str  # lightning_lowp modes
    backward_rounding: str
    clamping_grad_zero: bool
    backward_hooks: tuple[Callable[[torch.Tensor], torch.Tensor], ...]


class _QuantizeFunction(Protocol):
    """What :func:`quantizer` returns: a function of a tensor, with its settings as ``spec``."""

    spec: _Spec

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class _Rounding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: _Spec) -> torch.Tensor:
        ctx.spec, ctx.mask = spec, None
        if spec.forward is None:
            if spec.clamping_grad_zero:
                ctx.mask = torch.zeros_like(x, dtype=torch.bool)
            return x.clone()  # not a view: the next layer may modify it in place
        if spec.clamping_grad_zero:
            assert isinstance(spec.forward, FixedPoint)  # quantizer() allows only a clamping FixedPoint here
            out, ctx.mask = _fixed_with_mask(x, spec.forward, spec.forward_rounding)
            return out
        return _quantize(x, spec.forward.to_lowp(), spec.forward_rounding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        spec = ctx.spec
        for hook in spec.backward_hooks:
            grad = hook(grad)
        if spec.backward is not None:
            grad = _quantize(grad, spec.backward.to_lowp(), spec.backward_rounding)
        if ctx.mask is not None:
            grad = grad.masked_fill(ctx.mask, 0)
        return grad, None


def quantizer(
    forward_number: Number | None = None,
    backward_number: Number | None = None,
    forward_rounding: str = "stochastic",
    backward_rounding: str = "stochastic",
    clamping_grad_zero: bool = False,
    backward_hooks: Iterable[Callable[[torch.Tensor], torch.Tensor]] = (),
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``f(x)`` that rounds x forward and its gradient backward.

    ``f(x)`` is x rounded to ``forward_number`` in the forward pass; the gradient flowing back
    through it is rounded to ``backward_number`` (``None``: unchanged). (QPyTorch applies the
    hooks and the mask only with ``clamping_grad_zero=True`` and a ``backward_number``; here
    they always apply.)

    Args:
        forward_number: the number format of the forward pass, or ``None``.
        backward_number: the number format of the gradient, or ``None``.
        forward_rounding: ``"stochastic"`` or ``"nearest"``.
        backward_rounding: ``"stochastic"`` or ``"nearest"``.
        clamping_grad_zero: ``True`` (``forward_number`` a clamping ``FixedPoint`` or ``None``)
            zeroes the gradient of the elements the forward pass clamped.
        backward_hooks: functions applied, in order, to the gradient before its rounding.

    Returns:
        The function ``f``.

    Raises:
        ValueError: if an argument is not one QPyTorch accepts.
    """
    forward_number = _check_number(forward_number, "forward_number")
    backward_number = _check_number(backward_number, "backward_number")
    _check_rounding(forward_rounding, "forward_rounding")
    _check_rounding(backward_rounding, "backward_rounding")
    if not isinstance(clamping_grad_zero, bool):
        raise ValueError(f"clamping_grad_zero must be True or False, got {clamping_grad_zero!r}")
    if (
        clamping_grad_zero
        and forward_number is not None
        and not (isinstance(forward_number, FixedPoint) and forward_number.clamp)
    ):
        raise ValueError(
            "clamping_grad_zero=True needs forward_number to be a FixedPoint with clamp=True (or None), "
            f"got {forward_number!r}"
        )
    hooks: tuple[Callable[[torch.Tensor], torch.Tensor], ...] | None
    if isinstance(backward_hooks, Iterable) and not isinstance(backward_hooks, (str, bytes)):
        hooks = tuple(backward_hooks)
    else:
        hooks = None
    if hooks is None or not all(callable(h) for h in hooks):
        raise ValueError(f"backward_hooks must be an iterable of functions, got {backward_hooks!r}")
    spec = _Spec(
        forward=forward_number,
        backward=backward_number,
        forward_rounding=forward_number.rounding(forward_rounding) if forward_number is not None else "nearest",
        backward_rounding=backward_number.rounding(backward_rounding) if backward_number is not None else "nearest",
        clamping_grad_zero=clamping_grad_zero,
        backward_hooks=hooks,
    )

    def quantize(x: torch.Tensor) -> torch.Tensor:
        return _Rounding.apply(x, spec)

    function = cast(_QuantizeFunction, quantize)
    function.spec = spec
    return function


class Quantizer(nn.Module):
    """:func:`quantizer` as a module (QPyTorch's ``qtorch.quant.Quantizer``).

    Args:
        forward_number: the number format of the forward pass, or ``None``.
        backward_number: the number format of the gradient, or ``None``.
        forward_rounding: ``"stochastic"`` or ``"nearest"``.
        backward_rounding: ``"stochastic"`` or ``"nearest"``.

    Raises:
        ValueError: if an argument is not one QPyTorch accepts.
    """

    def __init__(
        self,
        forward_number: Number | None = None,
        backward_number: Number | None = None,
        forward_rounding: str = "stochastic",
        backward_rounding: str = "stochastic",
    ) -> None:
        super().__init__()
        self.quantize = quantizer(forward_number, backward_number, forward_rounding, backward_rounding)
        self.forward_number, self.backward_number = forward_number, backward_number
        self.forward_rounding, self.backward_rounding = forward_rounding, backward_rounding

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)

    @override
    def extra_repr(self) -> str:
        return (
            f"forward_number={self.forward_number}, backward_number={self.backward_number}, "
            f"forward_rounding={self.forward_rounding!r}, backward_rounding={self.backward_rounding!r}"
        )


# ---- optimizer -----------------------------------------------------------------------------


class OptimLP(Optimizer):
    """QPyTorch's low-precision optimizer wrapper around a ``torch.optim.SGD`` or ``Adam`` (``AdamW`` included).

    ``step()`` does, in QPyTorch's order: each gradient times ``grad_scaling``, rounded by
    ``grad_quant``; with ``acc_quant``, each weight replaced by its accumulator (a copy of the
    initial weight, kept across steps); the wrapped optimizer's step; ``acc_quant`` of the result
    kept as the accumulator; the weight set to ``weight_quant`` of it; SGD's ``momentum_buffer``
    (when momentum != 0) or Adam's ``exp_avg`` and ``exp_avg_sq`` replaced by ``momentum_quant``
    of them. Each ``*_quant`` is any function of a tensor (a ``Quantizer``, a ``quantizer``, a
    lambda) or ``None`` (left as is); a ``Quantizer`` applies its forward rounding.

    Beyond QPyTorch: ``step(closure)`` evaluates the closure first (QPyTorch ignores it), a
    parameter without a gradient or without optimizer state is skipped, a parameter group added
    later (``add_param_group``, on this optimizer or the wrapped one) gets its accumulators at
    its first step, from its weights then, and ``state_dict()`` holds the wrapped optimizer's
    state and the accumulators.

    Args:
        optim: the wrapped ``torch.optim.SGD`` or ``Adam`` (``AdamW`` included).
        weight_quant: rounds the weights after each step, or ``None``.
        grad_scaling: each gradient is multiplied by it before ``grad_quant`` (a positive finite number).
        grad_quant: rounds the (scaled) gradients, or ``None``.
        momentum_quant: rounds SGD's ``momentum_buffer`` or Adam's ``exp_avg`` and ``exp_avg_sq``, or ``None``.
        acc_quant: rounds the weight accumulators, or ``None`` (no accumulators).

    Raises:
        ValueError: if ``optim`` is not an SGD or Adam, a ``*_quant`` is not a function, or
            ``grad_scaling`` is not a positive finite number.
    """

    optim: SGD | Adam
    grad_scaling: float
    weight_quant: Callable[[torch.Tensor], torch.Tensor] | None
    grad_quant: Callable[[torch.Tensor], torch.Tensor] | None
    momentum_quant: Callable[[torch.Tensor], torch.Tensor] | None
    acc_quant: Callable[[torch.Tensor], torch.Tensor] | None
    momentum_keys: list[str]
    weight_acc: dict[torch.Tensor, torch.Tensor]

    def __init__(
        self,
        optim: SGD | Adam,
        weight_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
        grad_scaling: float = 1.0,
        grad_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
        momentum_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
        acc_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(optim, (SGD, Adam)):
            raise ValueError(
                f"optim must be a torch.optim.SGD or torch.optim.Adam (or AdamW) instance, got {type(optim).__name__} "
                "(QPyTorch's OptimLP supports these; lightning_lowp.LowPrecision handles any optimizer)"
            )
        for name, fn in (
            ("weight_quant", weight_quant),
            ("grad_quant", grad_quant),
            ("momentum_quant", momentum_quant),
            ("acc_quant", acc_quant),
        ):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a function of a tensor (e.g. a Quantizer) or None, got {fn!r}")
        if (
            not isinstance(grad_scaling, numbers.Real)
            or isinstance(grad_scaling, bool)
            or not float(grad_scaling) > 0
            or float(grad_scaling) == float("inf")
        ):
            raise ValueError(f"grad_scaling must be a positive finite number, got {grad_scaling!r}")
        super().__init__(optim.param_groups, optim.defaults)
        self.param_groups = optim.param_groups  # shared: learning-rate changes reach the wrapped optimizer
        self.state = optim.state
        self.optim = optim
        self.grad_scaling = float(grad_scaling)
        self.weight_quant, self.grad_quant = weight_quant, grad_quant
        self.momentum_quant, self.acc_quant = momentum_quant, acc_quant
        self.momentum_keys = ["momentum_buffer"] if isinstance(optim, SGD) else ["exp_avg", "exp_avg_sq"]
        self.weight_acc = {}
        if acc_quant is not None:
            for p in self._params():
                self._accumulator(p)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _accumulator(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s accumulator, made from its current value the first time it is asked for.

        At construction for the parameters then in the optimizer; lazily for those added later
        with ``add_param_group`` (on this optimizer or the wrapped one, which share their groups).
        """
        acc = self.weight_acc.get(p)
        if acc is None:
            acc = self.weight_acc[p] = p.detach().clone()
        return acc

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @override
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the wrapped optimizer with the quantizations around it (see the class).

        Args:
            closure: re-evaluates the model and returns the loss; evaluated first, with gradients enabled.

        Returns:
            The closure's loss, else what the wrapped optimizer's step returns.
        """
        loss: float | None = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.grad_quant is not None:
            for p in self._params():
                if p.grad is not None:
                    p.grad.data = self.grad_quant(p.grad.data * self.grad_scaling)
        if self.acc_quant is not None:
            for p in self._params():
                p.data = self._accumulator(p).data
        inner_loss = self.optim.step()
        loss = inner_loss if loss is None else loss
        if self.acc_quant is not None:
            for p in self._params():
                p.data = self.weight_acc[p].data = self.acc_quant(p.data).data
        if self.weight_quant is not None:
            for p in self._params():
                p.data = self.weight_quant(p.data).data
        if self.momentum_quant is not None:
            for group in self.param_groups:
                if isinstance(self.optim, SGD) and group["momentum"] == 0:
                    continue
                for p in group["params"]:
                    state = self.optim.state.get(p, {})
                    for key in self.momentum_keys:
                        if isinstance(state.get(key), torch.Tensor):
                            state[key] = self.momentum_quant(state[key])
        return loss

    @override
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @override
    def state_dict(self) -> dict[str, Any]:
        params = self._params()
        return {
            "optim": self.optim.state_dict(),
            "weight_acc": [self._accumulator(p).clone() for p in params] if self.acc_quant is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "optim" not in state_dict:
            raise ValueError("state_dict must be a dict from OptimLP.state_dict() (keys 'optim', 'weight_acc')")
        self.optim.load_state_dict(state_dict["optim"])
        self.state = self.optim.state
        accs = state_dict.get("weight_acc")
        if self.acc_quant is not None and accs is not None:
            params = self._params()
            if len(accs) != len(params):
                raise ValueError(f"state_dict holds {len(accs)} accumulators for {len(params)} parameters")
            for p, acc in zip(params, accs, strict=False):
                self.weight_acc[p] = acc.detach().to(device=p.device, dtype=p.dtype).clone()

    def __repr__(self) -> str:
        return f"LP Optimizer: {self.optim!r}"
