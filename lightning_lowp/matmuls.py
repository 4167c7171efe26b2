"""GEMM operands: quantize the operands of the matrix multiplies inside selected modules.

A linear layer ``y = x·Wᵀ`` with x (M×K), W (N×K) and the gradient dy (M×N) of its output runs
three GEMMs; each operand is quantized from its high-precision source for every GEMM it
enters, with its blocks along that GEMM's reduction axis:

- fprop ``y = q_in(x along K) · q_w(W along K)ᵀ`` (+ bias, not quantized);
- dgrad ``dx = q_go(dy along N) · q_w(W along N)``;
- wgrad ``dW = q_go(dy along M)ᵀ · q_in(x along M)``.

Leading batch dims of x are flattened into M. For ``torch.matmul(a, b)`` (``a @ b``,
``torch.bmm``) with a (…, M, K) and b (…, K, N), ``a`` takes the ``input`` role and ``b`` the
``weight`` role: fprop ``q_in(a along K) · q_w(b along K)``, ``da = q_go(dy along N) ·
q_w(b along N)ᵀ``, ``db = q_in(a along M)ᵀ · q_go(dy along M)``; batch dims stay batch dims.

A convolution is the implicit GEMM it runs: for each kernel offset, x as a (batch × C_in) matrix
per pixel, W as (C_out × C_in) and dy as (batch × C_out) per pixel, the reduction axis K laid
out as (kh, kw, C_in) with the channels innermost, and M as (H_out, W_out, batch) with the
batch innermost. A block never spans two kernel offsets or two pixels (K and M are padded per
offset and per pixel, as hardware implicit GEMMs pad channels), so every block of every operand
is a run of an NCHW tensor along one dim: fprop ``q_in(x along C_in) ⊛ q_w(W along C_in)``;
dgrad ``q_go(dy along C_out)``, ``q_w(W along C_out)``; wgrad ``q_go(dy along batch)``,
``q_in(x along batch)`` (as microxcaling's ``mx/convolution.py`` blocks them). A ``"row"`` block
is one pixel's (or one kernel offset's) run, a ``(rows, cols)`` tile covers those two axes
(batch × channels, or C_out × C_in) at one pixel or offset, and one scale per tensor covers the
whole tensor.

An operand's second use (W in dgrad, x and dy in wgrad) may take a format of its own
(``weight_for_dgrad``, ``input_for_wgrad``, ``grad_output_for_wgrad``, as torchao's
``cast_config_*_for_grad_*``). With ``wgrad_hadamard`` both wgrad operands are multiplied, 16
rows of M at a time, by the same random orthogonal 16×16 matrix ``H·diag(s)/4`` (H the Sylvester
Hadamard matrix, s a seeded random sign vector), as in the NVFP4 pretraining recipe: the
product is unchanged in exact arithmetic, and outliers are spread over 16 values before
quantization. M is padded with zero rows to a multiple of 16 for it.

"Along an axis" sets the ``dim`` of a block format: ``BlockFloatingPoint(wl, block_size=k)``
and ``ScaledFormat`` with blocks of ``k`` or ``"row"`` blocks. Element-wise formats, one
exponent or scale per tensor (``bfp(wl)``, ``block="tensor"``) and ``(rows, cols)`` tiles do not
depend on the axis: a tile covers the operand as stored (W as N×K, x as M×K, dy as M×N), so
both uses of an operand see the same tiles (NVFP4's 16x16 weight blocks).

Accumulation: each GEMM may also sum its products in low precision (``fprop_accumulate``,
``dgrad_accumulate``, ``wgrad_accumulate``: an :class:`~lightning_lowp.Accumulation`), by
``lp.matmul``'s kernel, in order along the contraction axis; ``None`` is torch's float32 GEMM.
A linear layer contracts over K (in_features) in fprop, N (out_features) in dgrad and M (the
tokens, leading dims flattened in order) in wgrad; the bias is added after the GEMM, in float32.
``a @ b`` runs one GEMM per batch element (over K, N, M); a broadcast operand's gradient is the
float32 sum of its per-batch GEMMs. A convolution runs as an explicit im2col GEMM in the layout
above (``F.unfold``, its K reordered from (C_in, kh, kw) to (kh, kw, C_in)):

- fprop: ``y[(h, w, n), co] = Σ_k cols[(h, w, n), k] · W[co, k]`` over k = (kh, kw, C_in), the
  channels innermost (padding pixels are zero products);
- dgrad: ``dcols[(h, w, n), k] = Σ_co dy[(h, w, n), co] · W[co, k]`` over C_out, then ``F.fold``
  (col2im) adds each input pixel's contributions from the kernel offsets in float32, into a
  zero, in (kh, kw) row-major order;
- wgrad: ``dW[co, k] = Σ_m dy[m, co] · cols[m, k]`` over m = (H_out, W_out, batch), the batch
  innermost (padded with zero rows by ``wgrad_hadamard``).

Conv1d runs as a conv2d of height 1. Stochastic rounding of the operands and of the
accumulation draws from the ``generator`` given (the callback's own stream; torch's default
generator when ``None``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_lowp.accumulation import accumulate_gemm
from lightning_lowp.accumulators import Accumulation, AccumulatorLike, as_accumulation, check_chunk
from lightning_lowp.formats import BlockFloatingPoint, Format, FormatLike, ScaledFormat, as_format, check_rounding
from lightning_lowp.functional import quantize
from lightning_lowp.recipes import check_keep_last, get_recipe
from lightning_lowp.selection import ModuleHookCallback, named_layers

__all__ = [
    "MatmulSettings",
    "QuantizeMatmuls",
    "quantized_linear",
    "quantized_matmul",
    "QuantizedLinearFunction",
    "QuantizedMatmulFunction",
    "QuantizedConvFunction",
    "quantized_conv",
    "random_hadamard",
    "Observer",
    "SECOND_USE",
    "along",
    "OPERAND_ROLES",
    "GEMMS",
]

#: The operand roles of a GEMM, each with a format and a rounding mode.
OPERAND_ROLES = ("input", "weight", "grad_output")
#: The GEMM of each role's second use, where a format of its own may replace the role's.
SECOND_USE = {"input": "wgrad", "weight": "dgrad", "grad_output": "wgrad"}
_SECOND_USE_KEYS = tuple(f"{role}_for_{gemm}" for role, gemm in SECOND_USE.items())
#: The three GEMMs of a layer, each of which may accumulate in low precision.
GEMMS = ("fprop", "dgrad", "wgrad")
_ACCUMULATE_KEYS = tuple(f"{gemm}_accumulate" for gemm in GEMMS)
_SETTING_KEYS = (
    *OPERAND_ROLES,
    *(f"{role}_rounding" for role in OPERAND_ROLES),
    *_SECOND_USE_KEYS,
    "wgrad_hadamard",
    "hadamard_seed",
    *_ACCUMULATE_KEYS,
)
#: ``observer(operand, source, quantized, fmt)``, called for each quantized operand with its
#: name (``"fprop.input"``, ``"dgrad.weight"``, ``"wgrad.grad_output"``, ...).
Observer = Callable[[str, torch.Tensor, torch.Tensor, Format], None]
# What QuantizeMatmuls.from_name accepts besides the recipe's name: the callback's own arguments.
_FROM_NAME_KEYS = (
    *_SETTING_KEYS,
    "keep_last",
    "modules",
    "names",
    "predicate",
    "overrides",
    "attention",
    "quantize_eval",
    "accumulate",
    "accumulate_rounding",
    "chunk",
)


@functools.lru_cache(maxsize=256)
def along(fmt: Format, axis: int) -> Format:
    """``fmt`` with its blocks running along ``axis`` of the tensor it quantizes.

    Blocks of ``k`` (``bfp(wl,block_size=k)``, ``mx(elem,k)``) and ``"row"`` blocks get
    ``dim=axis``; every other format (element-wise, whole-tensor, ``(rows, cols)`` tiles) is
    returned as is.

    Args:
        fmt: a parsed format whose ``dim`` is the default (-1).
        axis: the dim the blocks run along (a negative index, as -1 or -2).

    Returns:
        The format to quantize the operand with.
    """
    if isinstance(fmt, BlockFloatingPoint) and fmt.block_size is not None:
        return replace(fmt, dim=axis)
    if isinstance(fmt, ScaledFormat) and not isinstance(fmt.block, tuple) and fmt.block != "tensor":
        return replace(fmt, dim=axis)
    return fmt


def _check_operand_format(fmt: Format, role: str) -> None:
    """Refuse a format whose blocks cannot be laid along a GEMM's axes, naming ``role``."""
    if isinstance(fmt, (BlockFloatingPoint, ScaledFormat)) and fmt.dim != -1:
        raise ValueError(
            f"{role}={fmt} fixes dim={fmt.dim}, but a GEMM operand's block axis is chosen per GEMM (K forward, "
            "N or M backward); leave dim at its default: bfp(wl,block_size=k) or mx(element,k) for blocks of k "
            "along the axis, mx(element,row) for one scale per row along it, bfp(wl) or block=tensor for one per "
            "tensor, a (rows, cols) tile for the same tiles in every GEMM"
        )
    for axis in (-1, -2):  # what the kernels would refuse when a step runs
        try:
            quantize(torch.zeros(2, 2), along(fmt, axis))
        except ValueError as err:
            raise ValueError(f"{role}={fmt} cannot quantize a GEMM operand along dim {axis}: {err}") from None


@dataclass(frozen=True)
class MatmulSettings:
    """The formats and rounding modes of a GEMM's operands; ``None`` leaves an operand in float32.

    Formats may be given as spec strings; they are parsed and checked on construction. A
    format's ``dim`` must be the default: the block axis of each operand is chosen per GEMM
    (see :mod:`lightning_lowp.matmuls`).

    Args:
        input: the activation operand (x of a linear layer, ``a`` of ``a @ b``).
        weight: the weight operand (W of a linear layer, ``b`` of ``a @ b``).
        grad_output: the gradient of the GEMM's output, in the two backward GEMMs.
        input_rounding: the rounding mode of ``input`` (both uses); likewise for the other roles.
        weight_rounding: the rounding mode of ``weight``.
        grad_output_rounding: the rounding mode of ``grad_output``.
        input_for_wgrad: the format of x in the weight-gradient GEMM; ``None``: ``input``'s
            (``"fp32"`` leaves it unquantized).
        weight_for_dgrad: the format of W in the input-gradient GEMM; ``None``: ``weight``'s.
        grad_output_for_wgrad: the format of dy in the weight-gradient GEMM; ``None``:
            ``grad_output``'s (its first use is the input-gradient GEMM).
        wgrad_hadamard: multiply both weight-gradient operands by a random 16x16 Hadamard
            transform along M before quantizing them (the NVFP4 recipe's RHT).
        hadamard_seed: the seed of that transform's random signs.
        fprop_accumulate: how the forward GEMM accumulates: an ``lp.Accumulation`` (accumulator,
            rounding, promotion ``chunk``) or an accumulator alone (``"bf16"``,
            ``"aligned(32,14)"``, rounded to nearest, never promoted); ``None``: a float32 GEMM
            (torch's). The products are summed in the contraction order of
            :mod:`lightning_lowp.matmuls` ("Accumulation"), by :func:`lp.matmul`'s kernel.
        dgrad_accumulate: likewise for the input-gradient GEMM.
        wgrad_accumulate: likewise for the weight-gradient GEMM.

    Example:
        >>> s = lp.MatmulSettings(input="mx(fp8_e4m3,32)", weight="mx(fp8_e4m3,32)", grad_output="fp8_e5m2")
        >>> s = lp.MatmulSettings(input="fp8_e4m3", wgrad_accumulate=lp.Accumulation("bf16", chunk=128))
    """

    input: FormatLike | None = None
    weight: FormatLike | None = None
    grad_output: FormatLike | None = None
    input_rounding: str = "nearest"
    weight_rounding: str = "nearest"
    grad_output_rounding: str = "nearest"
    input_for_wgrad: FormatLike | None = None
    weight_for_dgrad: FormatLike | None = None
    grad_output_for_wgrad: FormatLike | None = None
    wgrad_hadamard: bool = False
    hadamard_seed: int = 0
    fprop_accumulate: Accumulation | AccumulatorLike | None = None
    dgrad_accumulate: Accumulation | AccumulatorLike | None = None
    wgrad_accumulate: Accumulation | AccumulatorLike | None = None

    def __post_init__(self) -> None:
        for key in (*OPERAND_ROLES, *_SECOND_USE_KEYS):
            value = getattr(self, key)
            if value is not None:
                fmt = as_format(value, key)
                _check_operand_format(fmt, key)
                object.__setattr__(self, key, fmt)
        for role in OPERAND_ROLES:
            check_rounding(getattr(self, f"{role}_rounding"), f"{role}_rounding")
        if not isinstance(self.wgrad_hadamard, bool):
            raise ValueError(f"wgrad_hadamard must be True or False, got {self.wgrad_hadamard!r}")
        if isinstance(self.hadamard_seed, bool) or not isinstance(self.hadamard_seed, int):
            raise ValueError(f"hadamard_seed must be an int, got {self.hadamard_seed!r}")
        for key in _ACCUMULATE_KEYS:
            object.__setattr__(self, key, as_accumulation(getattr(self, key), key))

    def accumulation_for(self, gemm: str) -> Accumulation | None:
        """How ``gemm`` (``"fprop"``, ``"dgrad"`` or ``"wgrad"``) accumulates; ``None``: a float32 GEMM."""
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
        acc: Accumulation | None = getattr(self, f"{gemm}_accumulate")
        return acc

    @functools.cached_property
    def stochastic(self) -> bool:
        """Whether any operand or accumulation rounds stochastically (and so draws random bits).

        Asked on every intercepted GEMM, so computed once (the settings are frozen).
        """
        accumulations = [self.accumulation_for(g) for g in GEMMS]
        return any(getattr(self, f"{r}_rounding") == "stochastic" for r in OPERAND_ROLES) or any(
            a is not None and a.rounding == "stochastic" for a in accumulations
        )

    def format_for(self, gemm: str, role: str) -> Format | None:
        """The format of ``role`` in ``gemm`` (``"fprop"``, ``"dgrad"`` or ``"wgrad"``); ``None``: float32."""
        if SECOND_USE[role] == gemm:
            second = getattr(self, f"{role}_for_{gemm}")
            if second is not None:
                return second
        return getattr(self, role)

    def quantize(
        self,
        gemm: str,
        role: str,
        t: torch.Tensor,
        axis: int,
        observer: Observer | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``t``, the ``role`` operand of ``gemm``, quantized with its blocks along ``axis``.

        Returned as is where the format is ``None``; ``observer`` (if given) sees the source and
        the quantized value; stochastic rounding draws from ``generator`` (torch's default when
        ``None``).
        """
        fmt = self.format_for(gemm, role)
        if fmt is None:
            return t
        fmt = (along.__wrapped__ if torch.compiler.is_compiling() else along)(fmt, axis)  # compile: no cache
        q = quantize(t, fmt, getattr(self, f"{role}_rounding"), generator)
        if observer is not None:
            observer(f"{gemm}.{role}", t, q, fmt)
        return q

    def __str__(self) -> str:
        defaults = {f.name: f.default for f in fields(self)}
        parts = [f"{role}={getattr(self, role)}" for role in OPERAND_ROLES]
        accs = [getattr(self, k) for k in _ACCUMULATE_KEYS]
        same = accs[0] is not None and accs.count(accs[0]) == len(accs)  # shown once, as QuantizeMatmuls takes it
        keys = [k for k in _SETTING_KEYS[3:] if not (same and k in _ACCUMULATE_KEYS)]
        parts += [f"{k}={getattr(self, k)}" for k in keys if getattr(self, k) != defaults[k]]
        if same:
            parts.append(f"accumulate={accs[0]}")
        return f"MatmulSettings({', '.join(parts)})"


@functools.lru_cache(maxsize=16)
def _hadamard_matrix(seed: int, device: torch.device) -> torch.Tensor:
    """``H·diag(s)/4``: the 16x16 Sylvester Hadamard matrix with random column signs, orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64) * 2 - 1
    return (h * signs / 4).to(torch.float32).to(device)


def random_hadamard(t: torch.Tensor, seed: int, dim: int = -2) -> torch.Tensor:
    """``t`` with every run of 16 along ``dim`` multiplied by the seeded random 16x16 Hadamard matrix.

    ``dim`` is padded with zeros to a multiple of 16 first (the result is that long). For two
    operands transformed alike, ``ht(a)ᵀ·ht(b) == aᵀ·b`` in exact arithmetic: the matrix is
    orthogonal and the padded rows add zero.
    """
    t = t.movedim(dim, -1)
    pad = -t.shape[-1] % 16
    if pad:
        t = F.pad(t, (0, pad))
    h = _hadamard_matrix(seed, t.device).to(t.dtype)
    out = (t.unflatten(-1, (-1, 16)) @ h.mT).flatten(-2)
    return out.movedim(-1, dim)


def _gemm(
    a: torch.Tensor, b: torch.Tensor, accumulation: Accumulation | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``a @ b`` (batch dims broadcast): torch's float32 GEMM, or summed in k order as ``accumulation`` says.

    Stochastic accumulation rounding draws its keys from ``generator`` (torch's default when
    ``None``), as the operands' stochastic rounding does.
    """
    if accumulation is None:
        return torch.matmul(a, b)
    return accumulate_gemm(a, b, accumulation, generator).to(torch.promote_types(a.dtype, b.dtype))


class QuantizedLinearFunction(torch.autograd.Function):
    """``F.linear`` with quantized GEMM operands: ``apply(x, weight, bias, settings, observer)``.

    Saves the high-precision x and W (not their quantized copies), so each backward GEMM
    quantizes them afresh along its own axis. A GEMM with an accumulation sums its products in
    order along its contraction axis: fprop over K (in_features), dgrad over N (out_features),
    wgrad over M (the tokens, leading dims flattened in order); the bias is added afterwards,
    in float32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        settings: MatmulSettings,
        observer: Observer | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings, ctx.observer, ctx.generator = settings, observer, generator
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        y = _gemm(
            settings.quantize("fprop", "input", x2, -1, observer, generator),
            settings.quantize("fprop", "weight", weight, -1, observer, generator).mT,
            settings.accumulation_for("fprop"),
            generator,
        )
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        s: MatmulSettings = ctx.settings
        obs, gen = ctx.observer, ctx.generator
        dy2 = dy.reshape(-1, weight.shape[0])  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dgrad: along N
            dx = _gemm(
                s.quantize("dgrad", "grad_output", dy2, -1, obs, gen),
                s.quantize("dgrad", "weight", weight, -2, obs, gen),
                s.accumulation_for("dgrad"),
                gen,
            )
            dx = dx.reshape(x.shape)
        if ctx.needs_input_grad[1]:  # wgrad: along M
            x2 = x.reshape(-1, x.shape[-1])
            if s.wgrad_hadamard:
                dy2, x2 = random_hadamard(dy2, s.hadamard_seed), random_hadamard(x2, s.hadamard_seed)
            dw = _gemm(
                s.quantize("wgrad", "grad_output", dy2, -2, obs, gen).mT,
                s.quantize("wgrad", "input", x2, -2, obs, gen),
                s.accumulation_for("wgrad"),
                gen,
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, weight.shape[0]).sum(0)
        return dx, dw, db, None, None, None


class QuantizedMatmulFunction(torch.autograd.Function):
    """``torch.matmul`` with quantized GEMM operands: ``apply(a, b, settings, observer)``, a the input, b the weight.

    1-D operands are treated as ``torch.matmul`` treats them (a row, a column); broadcast batch
    dims are summed out of the gradients. A GEMM with an accumulation runs per batch element,
    summing over K (fprop), N (``da``) or M (``db``) in order; where an operand was broadcast
    over batch dims, its gradient's per-batch GEMMs are then summed in float32 (as ``lp.matmul``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        settings: MatmulSettings,
        observer: Observer | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.settings, ctx.observer, ctx.generator = settings, observer, generator
        a2 = a.unsqueeze(0) if a.dim() == 1 else a  # (…, M, K)
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b  # (…, K, N)
        y = _gemm(
            settings.quantize("fprop", "input", a2, -1, observer, generator),
            settings.quantize("fprop", "weight", b2, -2, observer, generator),
            settings.accumulation_for("fprop"),
            generator,
        )
        if a.dim() == 1:
            y = y.squeeze(-2)
        if b.dim() == 1:
            y = y.squeeze(-1)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        s: MatmulSettings = ctx.settings
        obs, gen = ctx.observer, ctx.generator
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        if b.dim() == 1:
            dy = dy.unsqueeze(-1)
        if a.dim() == 1:
            dy = dy.unsqueeze(-2)  # (…, M, N)
        da = db = None
        if ctx.needs_input_grad[0]:  # along N
            da = _gemm(
                s.quantize("dgrad", "grad_output", dy, -1, obs, gen),
                s.quantize("dgrad", "weight", b2, -1, obs, gen).mT,
                s.accumulation_for("dgrad"),
                gen,
            )
            da = da.sum_to_size(a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:  # along M
            if s.wgrad_hadamard:
                a2, dy = random_hadamard(a2, s.hadamard_seed), random_hadamard(dy, s.hadamard_seed)
            db = _gemm(
                s.quantize("wgrad", "input", a2, -2, obs, gen).mT,
                s.quantize("wgrad", "grad_output", dy, -2, obs, gen),
                s.accumulation_for("wgrad"),
                gen,
            )
            db = db.sum_to_size(b2.shape).reshape(b.shape)
        return da, db, None, None, None


def _conv_quantize(
    s: MatmulSettings,
    gemm: str,
    role: str,
    t: torch.Tensor,
    axis: int,
    observer: Observer | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A conv operand quantized as its implicit GEMM's matrices: dims 0 and 1 are the GEMM's axes.

    ``t`` (x or dy as (batch, channels, *spatial), W as (C_out, C_in, *kernel)) is seen as a
    stack, over pixels or kernel offsets, of matrices whose rows run along dim 0 and columns
    along dim 1; ``axis`` -1 blocks along dim 1, -2 along dim 0.
    """
    fmt = s.format_for(gemm, role)
    if isinstance(fmt, ScaledFormat) and isinstance(fmt.block, tuple):  # tiles: (dim 0 x dim 1) per pixel
        view = t.movedim((0, 1), (-2, -1))
        return s.quantize(gemm, role, view, axis, observer, generator).movedim((-2, -1), (0, 1))
    # runs and rows: the block dim moved last and made contiguous, the kernels' fastest layout
    # (a copy at memory speed; along a strided dim they would gather every block)
    dim = 1 if axis == -1 else 0
    view = t.movedim(dim, -1).contiguous()
    return s.quantize(gemm, role, view, -1, observer, generator).movedim(-1, dim)


def _im2col(x: torch.Tensor, kernel: tuple[int, int], conv: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The implicit GEMM's activation matrix of a 2-D conv: (M, K), M as (H_out, W_out, batch), K as (kh, kw, C_in).

    ``F.unfold`` lays K out as (C_in, kh, kw); the channels are moved innermost. Padding
    pixels are zeros.
    """
    stride, padding, dilation = conv
    c = x.shape[1]
    cols = F.unfold(x, kernel, dilation, padding, stride)  # (N, C_in*kh*kw, L), K as (c, i, j)
    cols = cols.unflatten(1, (c, -1)).transpose(1, 2)  # (N, kh*kw, C_in, L)
    return cols.permute(3, 0, 1, 2).reshape(-1, cols.shape[1] * c)  # (L*N, kh*kw*C_in)


def _col2im(
    cols: torch.Tensor, x_shape: torch.Size, conv: tuple[tuple[int, ...], ...], kernel: tuple[int, int]
) -> torch.Tensor:
    """The inverse layout of :func:`_im2col`, each input pixel's kernel-offset contributions added by ``F.fold``.

    ``F.fold`` (torch's col2im) adds them in float32, into a zero, in (kh, kw) row-major order.
    """
    stride, padding, dilation = conv
    n, c = x_shape[0], x_shape[1]
    taps = kernel[0] * kernel[1]
    cols = cols.reshape(-1, n, taps, c).permute(1, 3, 2, 0).reshape(n, c * taps, -1)  # (N, C_in*kh*kw, L)
    return F.fold(cols, tuple(x_shape[2:]), kernel, dilation, padding, stride)


def _weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """A 2-D conv weight (C_out, C_in, kh, kw) as the implicit GEMM's (C_out, K) matrix, K as (kh, kw, C_in)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _gemm_conv(
    gemm: str,
    a: torch.Tensor,
    b: torch.Tensor,
    x_shape: torch.Size,
    w_shape: torch.Size,
    conv: tuple[tuple[int, ...], ...],
    accumulation: Accumulation,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One GEMM of a conv as an explicit implicit GEMM (im2col), accumulated as ``accumulation`` says.

    ``gemm`` ``"fprop"``: ``a`` is x, ``b`` W, returns y; ``"dgrad"``: ``a`` is dy, ``b`` W, returns
    dx; ``"wgrad"``: ``a`` is dy, ``b`` x, returns dW. Tensors are NCHW (1-D ones gain a height of
    1); the contraction orders are those of :mod:`lightning_lowp.matmuls` ("Accumulation").
    """
    one_d = len(x_shape) == 3
    if one_d:  # (batch, C, L) as (batch, C, 1, L)
        a, b = a.unsqueeze(2), b.unsqueeze(2)
        x_shape = torch.Size((x_shape[0], x_shape[1], 1, x_shape[2]))
        w_shape = torch.Size((w_shape[0], w_shape[1], 1, w_shape[2]))
        conv = tuple(((0,) if i == 1 else (1,)) + v for i, v in enumerate(conv))  # height: stride 1, no padding
    kernel = (w_shape[2], w_shape[3])
    if gemm == "fprop":  # over K = (kh, kw, C_in)
        y = _gemm(_im2col(a, kernel, conv), _weight_matrix(b).mT, accumulation, generator)  # (L*N, C_out)
        stride, padding, dilation = conv
        h_out, w_out = (
            (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
        )
        out = y.reshape(h_out, w_out, x_shape[0], w_shape[0]).permute(2, 3, 0, 1)
    elif gemm == "dgrad":  # over C_out, then col2im
        dy = a.permute(2, 3, 0, 1).reshape(-1, a.shape[1])  # (L*N, C_out)
        out = _col2im(_gemm(dy, _weight_matrix(b), accumulation, generator), x_shape, conv, kernel)
    else:  # wgrad: over M = (H_out, W_out, batch)
        dy = a.permute(1, 2, 3, 0).reshape(a.shape[1], -1)  # (C_out, L*N)
        dw = _gemm(dy, _im2col(b, kernel, conv), accumulation, generator)  # (C_out, K)
        out = dw.reshape(w_shape[0], kernel[0], kernel[1], w_shape[1]).permute(0, 3, 1, 2)
    return (out.squeeze(2) if one_d else out).contiguous()


class QuantizedConvFunction(torch.autograd.Function):
    """``F.conv1d`` / ``F.conv2d`` with quantized implicit-GEMM operands (``groups=1``).

    ``apply(x, weight, bias, stride, padding, dilation, settings, observer)`` with integer
    tuples for stride, padding and dilation. Blocks: fprop along C_in (x and W), dgrad along
    C_out (dy and W), wgrad along the batch (dy and x); see :mod:`lightning_lowp.matmuls`. A
    GEMM with an accumulation runs as an explicit im2col GEMM in the documented contraction
    order; the others run as torch's convolutions.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        settings: MatmulSettings,
        observer: Observer | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings, ctx.observer, ctx.generator = settings, observer, generator
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        qx = _conv_quantize(settings, "fprop", "input", x, -1, observer, generator)
        qw = _conv_quantize(settings, "fprop", "weight", weight, -1, observer, generator)
        acc = settings.accumulation_for("fprop")
        if acc is None:
            return conv(qx, qw, bias, stride, padding, dilation)
        y = _gemm_conv("fprop", qx, qw, x.shape, weight.shape, ctx.conv, acc, generator)
        if bias is not None:
            y = y + bias.reshape(-1, *(1,) * (y.dim() - 2))
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        s: MatmulSettings = ctx.settings
        obs, gen = ctx.observer, ctx.generator
        stride, padding, dilation = ctx.conv
        conv_input, conv_weight = (
            (nn_grad.conv1d_input, nn_grad.conv1d_weight)
            if x.dim() == 3
            else (nn_grad.conv2d_input, nn_grad.conv2d_weight)
        )
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dgrad: along C_out
            qdy = _conv_quantize(s, "dgrad", "grad_output", dy, -1, obs, gen)
            qw = _conv_quantize(s, "dgrad", "weight", weight, -2, obs, gen)
            acc = s.accumulation_for("dgrad")
            if acc is None:
                dx = conv_input(x.shape, qw, qdy, stride, padding, dilation)
            else:
                dx = _gemm_conv("dgrad", qdy, qw, x.shape, weight.shape, ctx.conv, acc, gen)
        if ctx.needs_input_grad[1]:  # wgrad: along the batch
            xs, dys = x, dy
            if s.wgrad_hadamard:
                xs, dys = random_hadamard(x, s.hadamard_seed, 0), random_hadamard(dy, s.hadamard_seed, 0)
            qx = _conv_quantize(s, "wgrad", "input", xs, -2, obs, gen)
            qdy = _conv_quantize(s, "wgrad", "grad_output", dys, -2, obs, gen)
            acc = s.accumulation_for("wgrad")
            if acc is None:
                dw = conv_weight(qx, weight.shape, qdy, stride, padding, dilation)
            else:
                dw = _gemm_conv("wgrad", qdy, qx, qx.shape, weight.shape, ctx.conv, acc, gen)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum([0, *range(2, dy.dim())])
        return dx, dw, db, None, None, None, None, None, None


def _check_settings(settings: object) -> None:
    if not isinstance(settings, MatmulSettings):
        raise TypeError(f"settings must be a lightning_lowp.MatmulSettings, got {type(settings).__name__}")


def quantized_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    settings: MatmulSettings | None = None,
    observer: Observer | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` with its three GEMMs' operands quantized.

    Args:
        input: x, (…, K); leading dims are flattened into M.
        weight: W, (N, K).
        bias: (N,) or ``None``; added in float32 and not quantized.
        settings: the operands' formats; ``None`` is plain ``F.linear``.
        observer: called with each quantized operand (see ``Observer``).
        generator: what stochastic rounding draws from (torch's default generator when ``None``).

    Returns:
        y, (…, N), differentiable in input, weight and bias.

    Example:
        >>> s = lp.MatmulSettings(input="mx(fp8_e4m3,32)", weight="mx(fp8_e4m3,32)", grad_output="fp8_e5m2")
        >>> y = lp.quantized_linear(torch.randn(8, 64), torch.randn(16, 64), None, s)
    """
    if settings is None:
        return F.linear(input, weight, bias)
    _check_settings(settings)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    return QuantizedLinearFunction.apply(input, weight, bias, settings, observer, generator)


def quantized_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    settings: MatmulSettings | None = None,
    observer: Observer | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``torch.matmul(a, b)`` with its GEMMs' operands quantized: a in ``input``'s format, b in ``weight``'s.

    Args:
        a: (…, M, K) (or (K,)).
        b: (…, K, N) (or (K,)); batch dims broadcast as in ``torch.matmul``.
        settings: the operands' formats; ``None`` is plain ``torch.matmul``.
        observer: called with each quantized operand (see ``Observer``).
        generator: what stochastic rounding draws from (torch's default generator when ``None``).

    Returns:
        The product, differentiable in a and b.
    """
    if settings is None:
        return torch.matmul(a, b)
    _check_settings(settings)
    return QuantizedMatmulFunction.apply(a, b, settings, observer, generator)


def quantized_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    settings: MatmulSettings | None = None,
    observer: Observer | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``F.conv1d`` / ``F.conv2d`` (by ``input``'s dims) with its implicit GEMMs' operands quantized.

    Args:
        input: x, (batch, C_in, L) or (batch, C_in, H, W).
        weight: W, (C_out, C_in, *kernel).
        bias: (C_out,) or ``None``; added in float32 and not quantized.
        stride: as in ``F.conv2d``.
        padding: as in ``F.conv2d``, including ``"same"`` and ``"valid"``.
        dilation: as in ``F.conv2d``.
        groups: must be 1 (a block along channels would cross groups).
        settings: the operands' formats; ``None`` is plain ``F.conv1d`` / ``F.conv2d``.
        observer: called with each quantized operand (see ``Observer``).
        generator: what stochastic rounding draws from (torch's default generator when ``None``).

    Returns:
        The convolution, differentiable in input, weight and bias.

    Raises:
        ValueError: for ``groups != 1``, an input that is not 3-D or 4-D, or a weight whose
            dims do not match it.
    """
    if input.dim() not in (3, 4) or weight.dim() != input.dim():
        raise ValueError(
            "quantized_conv needs input (batch, C_in, L) with weight (C_out, C_in, k) or input (batch, C_in, H, W) "
            f"with weight (C_out, C_in, kh, kw); got input {tuple(input.shape)} and weight {tuple(weight.shape)}"
        )
    n = input.dim() - 2
    conv = F.conv1d if n == 1 else F.conv2d
    if settings is None:
        return conv(input, weight, bias, stride, padding, dilation, groups)
    _check_settings(settings)
    if groups != 1:
        raise ValueError(
            f"groups={groups}: QuantizeMatmuls quantizes convolutions with groups=1 only (a block along the "
            "channels would span two groups); leave grouped and depthwise convolutions out of the selection"
        )

    def ints(v: int | Sequence[int], name: str) -> tuple[int, ...]:
        t = (v,) * n if isinstance(v, int) else tuple(v)
        if len(t) != n or not all(isinstance(i, int) for i in t):
            raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
        return t

    strides, dilations = ints(stride, "stride"), ints(dilation, "dilation")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or {n} ints, got {padding!r}")
        pads = (0,) * n
        if padding == "same" and any(st != 1 for st in strides):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride!r} (as in torch)")
        if padding == "same":  # torch's split: the odd one out goes to the end
            totals = [d * (k - 1) for d, k in zip(dilations, weight.shape[2:], strict=True)]
            pad_args = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
            input = F.pad(input, pad_args)
    else:
        pads = ints(padding, "padding")
    return QuantizedConvFunction.apply(input, weight, bias, strides, pads, dilations, settings, observer, generator)


# ---- the callback ---------------------------------------------------------------------------

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


def _plain(*tensors: object) -> bool:
    """Floating-point tensors of torch's own types (subclasses such as DTensor are left alone)."""
    return all(
        isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()
        for t in tensors
    )


class _MatmulMode(TorchFunctionMode):
    """Routes ``F.linear``, ``F.conv1d``/``F.conv2d`` (and, with ``attention``, matmuls) to the quantized functions.

    Active from the first selected module's forward pre-hook to the last one's forward hook;
    the innermost selected module's settings apply. Inside its handler the mode is off, so the
    GEMMs of the quantized functions are not intercepted again.
    """

    def __init__(self, owner: QuantizeMatmuls) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        owner = self.owner
        name, settings = owner._stack[-1] if owner._stack else ("", None)
        if settings is None:
            return func(*args, **kwargs)
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
            x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            if len(bound) <= 3 and _plain(x, w) and w.dim() == 2 and (b is None or _plain(b)):  # type: ignore[union-attr]
                owner.counts[(name, "linear")] += 1
                return QuantizedLinearFunction.apply(
                    x, w, b, settings, owner._observer(name), owner._generator(settings)
                )
        elif func in _CONVS:
            keys = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            bound = dict(zip(keys, args, strict=False), **kwargs)
            x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            if _plain(x, w) and (b is None or _plain(b)):
                owner.counts[(name, "conv")] += 1
                bound.pop("input")
                observer, generator = owner._observer(name), owner._generator(settings)
                return quantized_conv(x, settings=settings, observer=observer, generator=generator, **bound)  # type: ignore[arg-type]
        elif owner.attention and func in _MATMULS and not kwargs and len(args) == 2 and _plain(*args):
            owner.counts[(name, "matmul")] += 1
            return QuantizedMatmulFunction.apply(
                args[0], args[1], settings, owner._observer(name), owner._generator(settings)
            )
        return func(*args, **kwargs)


class QuantizeMatmuls(ModuleHookCallback[MatmulSettings]):
    """Quantize the operands of the matrix multiplies inside selected modules.

    Every ``F.linear`` run in a selected module's forward (that of ``nn.Linear``, and of any
    module calling it) is replaced by :func:`quantized_linear`, every ``F.conv1d`` /
    ``F.conv2d`` by :func:`quantized_conv` (select ``nn.Conv1d`` / ``nn.Conv2d`` for them);
    with ``attention=True`` also ``torch.matmul``, ``a @ b`` and ``torch.bmm`` (by
    :func:`quantized_matmul`: the left operand takes the ``input`` format, the right one the
    ``weight`` format). Parameters, ``state_dict`` and optimizers are untouched: the model
    computes in float32 with quantized GEMM operands. The callback picks each operand's block
    axis (see :mod:`lightning_lowp.matmuls`); a format that fixes ``dim`` is refused.

    Hooks are attached when fit, validate, test or predict starts and removed when it ends
    (also after an error); the selection is checked then, before any step runs. Selected
    modules may nest: the innermost one's settings apply.

    Args:
        input: the format (object or spec string) of the activation operand; ``None``: float32.
        weight: the format of the weight operand; ``None``: float32.
        grad_output: the format of the output gradient in the backward GEMMs; ``None``: float32.
        input_rounding: the rounding mode of ``input``.
        weight_rounding: the rounding mode of ``weight``.
        grad_output_rounding: the rounding mode of ``grad_output``.
        input_for_wgrad: x's format in the weight-gradient GEMM (``None``: ``input``'s).
        weight_for_dgrad: W's format in the input-gradient GEMM (``None``: ``weight``'s).
        grad_output_for_wgrad: dy's format in the weight-gradient GEMM (``None``: ``grad_output``'s).
        wgrad_hadamard: the random 16x16 Hadamard transform of both weight-gradient operands.
        hadamard_seed: the seed of its random signs.
        accumulate: the accumulator of all three GEMMs: an ``lp.Accumulation``, or a float format
            (``"bf16"``, ``"fp16"``) or ``lp.AlignedSum`` (``"aligned(32,14)"``) taken with
            ``accumulate_rounding`` and ``chunk``; ``None``: float32 GEMMs (torch's).
        accumulate_rounding: the rounding of every addition into ``accumulate`` (for an
            ``AlignedSum``, of its store into float32).
        chunk: promote the accumulator into float32 every ``chunk`` products; ``None``: never.
        fprop_accumulate: the forward GEMM's accumulation (an ``lp.Accumulation`` or an
            accumulator), in place of ``accumulate``'s; ``None``: ``accumulate``'s.
        dgrad_accumulate: likewise for the input-gradient GEMM.
        wgrad_accumulate: likewise for the weight-gradient GEMM.
        modules: module types whose forward is intercepted (default ``(nn.Linear,)``); ``None``
            selects every module (narrow with ``names`` or ``predicate``).
        names: fnmatch patterns of qualified module names; each must match at least one module.
        predicate: ``predicate(name, module) -> bool``, a further filter.
        overrides: ``{pattern: {"input": ..., "weight_rounding": ..., ...}}`` per-module
            settings merged over the others, e.g. ``{"head": {"input": "bf16", "weight": "bf16",
            "grad_output": "bf16"}}``; each pattern must match a selected module. Besides the
            settings' keys (``fprop_accumulate``, ...), ``"accumulate"`` sets all three GEMMs'
            accumulation (``None``: float32).
        keep_last: the last ``keep_last`` selected modules (in the model's module order) take
            bf16 for every operand and float32 GEMMs, whatever the overrides say; a float in
            [0, 1) is a fraction of the selected modules, rounded up (the NVFP4 recipe keeps its
            last layers in bf16).
        attention: also quantize ``torch.matmul`` / ``@`` / ``torch.bmm`` inside the selected
            modules (off by default: attention's ``q @ kᵀ`` and ``p @ v``); select the modules
            that call them (by type or name).
        quantize_eval: also quantize in validation, test and predict; ``False``: training only.
        recipe: take the settings from a registered recipe's ``matmul_*`` fields (as
            ``from_name``; handy in YAML configs).

    Example:
        >>> trainer = L.Trainer(callbacks=[lp.QuantizeMatmuls.from_name("mxfp8")])
    """

    quantized_what = "GEMM operand"
    # an override for a module that is not selected (a head that is not nn.Linear) would do nothing
    overrides_match_selected = True

    def __init__(
        self,
        input: FormatLike | None = None,
        weight: FormatLike | None = None,
        grad_output: FormatLike | None = None,
        input_rounding: str = "nearest",
        weight_rounding: str = "nearest",
        grad_output_rounding: str = "nearest",
        input_for_wgrad: FormatLike | None = None,
        weight_for_dgrad: FormatLike | None = None,
        grad_output_for_wgrad: FormatLike | None = None,
        wgrad_hadamard: bool = False,
        hadamard_seed: int = 0,
        accumulate: Accumulation | AccumulatorLike | None = None,
        accumulate_rounding: str = "nearest",
        chunk: int | None = None,
        fprop_accumulate: Accumulation | AccumulatorLike | None = None,
        dgrad_accumulate: Accumulation | AccumulatorLike | None = None,
        wgrad_accumulate: Accumulation | AccumulatorLike | None = None,
        modules: Sequence[type[nn.Module]] | None = (nn.Linear,),
        names: Sequence[str] | None = None,
        predicate: Callable[[str, nn.Module], bool] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        keep_last: int | float = 0,
        attention: bool = False,
        quantize_eval: bool = True,
        recipe: str | None = None,
    ) -> None:
        super().__init__()
        given: dict[str, Any] = {
            "input": input,
            "weight": weight,
            "grad_output": grad_output,
            "input_rounding": input_rounding,
            "weight_rounding": weight_rounding,
            "grad_output_rounding": grad_output_rounding,
            "input_for_wgrad": input_for_wgrad,
            "weight_for_dgrad": weight_for_dgrad,
            "grad_output_for_wgrad": grad_output_for_wgrad,
            "wgrad_hadamard": wgrad_hadamard,
            "hadamard_seed": hadamard_seed,
            **_accumulations(
                accumulate, accumulate_rounding, chunk, (fprop_accumulate, dgrad_accumulate, wgrad_accumulate)
            ),
            "keep_last": keep_last,
        }
        if recipe is not None:
            defaults = {**{f.name: f.default for f in fields(MatmulSettings)}, "keep_last": 0}
            changed = [k for k, v in given.items() if v != defaults[k]]
            if changed:
                raise ValueError(
                    f"give either recipe={recipe!r} or formats, not both (got {', '.join(changed)}); "
                    f"use QuantizeMatmuls.from_name({recipe!r}, {changed[0]}=...) to change a recipe"
                )
            given = _recipe_settings(recipe)
        self.keep_last = given.pop("keep_last")
        check_keep_last(self.keep_last)
        self.settings = MatmulSettings(**given)
        if not isinstance(attention, bool):
            raise ValueError(f"attention must be True or False, got {attention!r}")
        self._init_selection(modules, names, predicate, quantize_eval)
        self.overrides = {}
        base = {k: getattr(self.settings, k) for k in _SETTING_KEYS}
        for pattern, per_module in (overrides or {}).items():
            unknown = set(per_module) - {*_SETTING_KEYS, "accumulate"}
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; accepted: "
                    f"{', '.join(_SETTING_KEYS)}, accumulate"
                )
            if "accumulate" in per_module:  # all three GEMMs, unless one is given as well
                per_module = dict(per_module)
                common = as_accumulation(per_module.pop("accumulate"), f"overrides[{pattern!r}]['accumulate']")
                per_module = {**dict.fromkeys(_ACCUMULATE_KEYS, common), **per_module}
            self.overrides[pattern] = MatmulSettings(**{**base, **per_module})
        self.attention = attention
        #: How many GEMMs were quantized, by (module name, ``"linear"``, ``"conv"`` or ``"matmul"``).
        self.counts: Counter[tuple[str, str]] = Counter()
        #: ``observer(module, operand, source, quantized, fmt)``, set by QuantizationMetrics on
        #: the steps it samples; ``None``: no operand is observed.
        self.observer: Callable[[str, str, torch.Tensor, torch.Tensor, Format], None] | None = None
        self._stack: list[tuple[str, MatmulSettings | None]] = []  # the selected modules now running
        self._mode: _MatmulMode | None = None

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> QuantizeMatmuls:
        """The ``matmul_*`` settings of a registered recipe (see ``lp.list_recipes()``).

        Args:
            name: a registered recipe's name, e.g. ``"mxfp8"``, ``"nvfp4"``, ``"fp8_blockwise"``.
            **kwargs: arguments of :class:`QuantizeMatmuls` other than ``recipe``: settings to
                replace (``input``, ``weight``, ``grad_output``, their ``*_rounding``, ...,
                ``keep_last``) and the selection (``modules``, ``names``, ``predicate``,
                ``overrides``, ``attention``, ``quantize_eval``).

        Raises:
            ValueError: for an unknown recipe or argument, naming the accepted ones.
        """
        unknown = set(kwargs) - set(_FROM_NAME_KEYS)
        if unknown:
            raise ValueError(f"unknown arguments {sorted(unknown)}; accepted: {', '.join(_FROM_NAME_KEYS)}")
        settings = _recipe_settings(name, kwargs)
        if any(k in kwargs for k in ("accumulate", "accumulate_rounding", "chunk")):
            for key in _ACCUMULATE_KEYS:  # the given accumulation replaces the recipe's, GEMM by GEMM
                settings[key] = None
        return cls(**{**settings, **kwargs})

    # ---- selection ------------------------------------------------------------------

    @override
    def select(self, model: nn.Module) -> dict[str, MatmulSettings]:
        """The selected modules with their settings; the last ``keep_last`` of them in bf16.

        Raises:
            ValueError: for a selected convolution this callback cannot quantize (groups > 1,
                3-D, transposed), naming it.
        """
        selected = super().select(model)
        modules = named_layers(model)
        for name in selected:
            m = modules[name]
            if isinstance(m, nn.modules.conv._ConvNd) and (not isinstance(m, (nn.Conv1d, nn.Conv2d)) or m.groups != 1):
                raise ValueError(
                    f"module {name!r} ({type(m).__name__}, groups={m.groups}) is selected, but QuantizeMatmuls "
                    "quantizes nn.Conv1d and nn.Conv2d with groups=1 only; leave it out (names=, predicate=)"
                )
        n = self.keep_last if isinstance(self.keep_last, int) else math.ceil(self.keep_last * len(selected))
        for name in list(selected)[len(selected) - min(n, len(selected)) :]:
            selected[name] = _BF16
        return selected

    # ---- hooks ----------------------------------------------------------------------

    @override
    def _describe(self) -> str:
        kept = f", keep_last={self.keep_last}" if self.keep_last else ""
        return f"{self.settings}, attention={self.attention}{kept}"

    @override
    def _hook_module(
        self, name: str, module: nn.Module, settings: MatmulSettings
    ) -> list[torch.utils.hooks.RemovableHandle]:
        return [
            module.register_forward_pre_hook(self._enter(name, settings)),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    @override
    def detach(self) -> None:
        """Remove the hooks (and leave the interception, should a forward have stopped half way)."""
        super().detach()
        self._stack.clear()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def _generator(self, settings: MatmulSettings) -> torch.Generator | None:
        """The callback's own random stream where ``settings`` round stochastically, else ``None``."""
        return self.generator if settings.stochastic else None

    def _observer(self, name: str) -> Observer | None:
        """The observer of module ``name``'s operands now (``None`` outside sampled steps)."""
        observer = self.observer
        if observer is None:
            return None
        return lambda operand, source, q, fmt: observer(name, operand, source, q, fmt)

    def _enter(self, name: str, settings: MatmulSettings) -> Callable[[nn.Module, Any], None]:
        def push(module: nn.Module, args: Any) -> None:
            active = self._active(module)
            if not self._stack:
                self._mode = _MatmulMode(self)
                self._mode.__enter__()
            self._stack.append((name, settings if active else None))

        return push

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        # always_call: also when the forward raised, so the mode never outlives the module.
        if self._stack:
            self._stack.pop()
            if not self._stack and self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None


_CONVS = {F.conv1d, F.conv2d}
# The operands of the modules keep_last leaves in high precision.
_BF16 = MatmulSettings(input="bf16", weight="bf16", grad_output="bf16")


def _recipe_settings(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``matmul_*`` fields of recipe ``name`` as QuantizeMatmuls arguments.

    Raises:
        ValueError: for an unknown recipe, or one that sets no matmul operand while ``given``
            sets no format either.
    """
    r = get_recipe(name)
    settings = {k: getattr(r, f"matmul_{k}") for k in (*_SETTING_KEYS, "keep_last")}
    keys = (*OPERAND_ROLES, *_ACCUMULATE_KEYS)
    if all(settings[k] is None for k in keys) and not any(
        (given or {}).get(k) is not None for k in (*keys, "accumulate")
    ):
        raise ValueError(
            f"recipe {name!r} sets no GEMM operand (matmul_input, matmul_weight, matmul_grad_output are None) "
            "and no accumulation; recipes for QuantizeMatmuls: mxfp8, mxfp4, nvfp4, fp8_tensorwise, fp8_rowwise, "
            "fp8_blockwise, fp8_deepseek_v3"
        )
    return settings


def _accumulations(
    accumulate: object, rounding: object, chunk: object, per_gemm: tuple[object, object, object]
) -> dict[str, Accumulation | None]:
    """``QuantizeMatmuls``'s accumulation arguments as the ``*_accumulate`` settings, checked.

    ``accumulate`` (with ``rounding`` and ``chunk``) applies to each GEMM whose own setting is
    ``None``.

    Raises:
        ValueError: naming the argument that is not accepted.
    """
    check_chunk(chunk)
    if isinstance(accumulate, Accumulation):
        if rounding != "nearest" or chunk is not None:
            raise ValueError(
                f"accumulate={accumulate!r} is an lp.Accumulation, which has its own rounding and chunk; give "
                f"accumulate_rounding and chunk only with an accumulator spec (got {rounding!r}, {chunk!r})"
            )
        common: Accumulation | None = accumulate
    elif accumulate is None:
        if rounding != "nearest" or chunk is not None:
            raise ValueError(
                f"accumulate_rounding={rounding!r} and chunk={chunk!r} need accumulate (an accumulator such as "
                "'bf16' or 'aligned(32,14)'); the per-GEMM *_accumulate arguments take an lp.Accumulation"
            )
        common = None
    else:
        common = Accumulation(accumulate, rounding, chunk)  # type: ignore[arg-type]
    return {
        key: common if value is None else as_accumulation(value, key)
        for key, value in zip(_ACCUMULATE_KEYS, per_gemm, strict=True)
    }
