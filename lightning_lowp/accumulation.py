"""Matrix products with low-precision accumulation: ``lp.matmul``.

``matmul(a, b, accumulate="fp16")`` computes ``a @ b`` the way hardware with an fp16
accumulator would: the products ``fl32(a[m, k] * b[k, n])`` are added in k order into an
accumulator held in the ``accumulate`` format, every addition rounded once, from the exact
sum, in ``accumulate_rounding``; with ``chunk=c`` the accumulator is added into a float32
accumulator every ``c`` products (promotion, as DeepSeek-V3 does every 128). The bits are
those of :func:`lightning_lowp.accumulation_reference.reference_matmul` (the contract, in its
module docstring), computed by the compiled operator ``torch.ops.lowp.matmul_accumulate``
(CPU and CUDA kernels over the same scalar functions: the same bits); ``lp.AlignedSum`` by
``torch.ops.lowp.matmul_aligned``. ``accumulate=None`` is plain ``torch.matmul``.

Gradients are GEMMs too, with the same accumulator settings: for ``y = a @ b``,
``da = matmul(dy, bᵀ)`` and ``db = matmul(aᵀ, dy)``, each accumulated in ``accumulate`` with
``accumulate_rounding`` and ``chunk``; where ``a`` or ``b`` was broadcast over batch dims, the
per-batch gradients are then summed over those dims in float32 (``Tensor.sum_to_size``).
Stochastic rounding draws a fresh key from ``generator`` for the forward and for each
backward GEMM.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_lowp import ops
from lightning_lowp.accumulators import Accumulation, AccumulatorLike, AlignedSum
from lightning_lowp.formats import ROUNDING_MODES

__all__ = ["matmul", "accumulate_gemm"]


def _check_operand(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device.type not in ("cpu", "cuda") or (x.device.type == "cuda" and not ops.BUILT_WITH_CUDA):
        where = "the CPU or a CUDA GPU" if ops.BUILT_WITH_CUDA else "the CPU (this build has no CUDA kernels)"
        raise ValueError(f"{name} must be on {where}, got {x.device}")
    if x.dim() < 2:
        shape = "(..., M, K)" if name == "a" else "(K, N) or (..., K, N)"
        raise ValueError(f"{name} must have at least 2 dims {shape}, got shape {tuple(x.shape)}")
    return x


def _check_operands(a_arg: object, b_arg: object) -> None:
    a = _check_operand(a_arg, "a")
    b = _check_operand(b_arg, "b")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a (..., M, K) and b (..., K, N) must have the same K, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch dims of a {tuple(a.shape[:-2])} and b {tuple(b.shape[:-2])} do not broadcast"
        ) from None


def accumulate_gemm(
    a: torch.Tensor, b: torch.Tensor, accumulation: Accumulation, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``a @ b`` accumulated as ``accumulation`` says, without autograd: (*batch, M, N) float32.

    ``a`` is (..., M, K), ``b`` (..., K, N), batch dims broadcast; both are taken as float32.
    """
    _check_operands(a, b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    count = math.prod(batch)
    a3 = a.detach().to(torch.float32).expand(*batch, m, k).reshape(count, m, k).contiguous()
    b3 = b.detach().to(torch.float32).expand(*batch, k, n).reshape(count, k, n).contiguous()
    mode = ROUNDING_MODES.index(accumulation.rounding)
    chunk = accumulation.chunk or 0
    acc = accumulation.accumulator
    if isinstance(acc, AlignedSum):
        out = ops.matmul_aligned(a3, b3, acc.group, acc.bits, mode, chunk)
    else:
        kind, params = ops.kernel_args(acc)
        out = ops.matmul_accumulate(a3, b3, kind, params, mode, chunk, generator)
    return out.reshape(*batch, m, n)


class _MatmulAccumulateFunction(torch.autograd.Function):
    """Forward: the accumulated GEMM; backward: both gradients as accumulated GEMMs."""

    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, b: torch.Tensor, accumulation: Accumulation, generator: torch.Generator | None
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.settings = (accumulation, generator)
        return accumulate_gemm(a, b, accumulation, generator)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        accumulation, generator = ctx.settings
        da = db = None
        if ctx.needs_input_grad[0]:
            da = accumulate_gemm(dy, b.transpose(-2, -1), accumulation, generator)
            da = da.sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            db = accumulate_gemm(a.transpose(-2, -1), dy, accumulation, generator)
            db = db.sum_to_size(b.shape).to(b.dtype)
        return da, db, None, None


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    accumulate: AccumulatorLike | None = None,
    accumulate_rounding: str = "nearest",
    chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``a @ b`` with every addition of the products rounded to a low-precision accumulator.

    Args:
        a: (..., M, K), a floating-point tensor on the CPU or a CUDA GPU (computed as float32).
        b: (K, N) or (..., K, N), a floating-point tensor on a's device; batch dims broadcast as in
            ``torch.matmul``.
        accumulate: the accumulator: a float format (``FloatingPoint`` or a spec such as
            ``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``), every addition rounded to it; or the
            tensor-core model ``lp.AlignedSum(group, bits)`` (spec ``"aligned(g,b)"``);
            ``None``: plain ``torch.matmul``.
        accumulate_rounding: the rounding mode of every addition (one of ``lp.ROUNDING_MODES``);
            for an ``AlignedSum``, of its store into float32 (``"nearest"`` or ``"toward_zero"``).
        chunk: promote the accumulator into float32 every ``chunk`` products; ``None``: never
            (for an ``AlignedSum``, a multiple of its group).
        generator: the CPU generator stochastic rounding draws its keys from (torch's default
            when ``None``).

    Returns:
        (..., M, N): float32 where ``accumulate`` is given (the bits of
        ``accumulation_reference.reference_matmul``), else ``torch.matmul(a, b)``.

    Raises:
        ValueError: naming the argument that is not accepted.
    """
    if accumulate is None:
        return torch.matmul(a, b)
    accumulation = Accumulation(accumulate, accumulate_rounding, chunk)
    _check_operands(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out: torch.Tensor = _MatmulAccumulateFunction.apply(a, b, accumulation, generator)
        return out
    return accumulate_gemm(a, b, accumulation, generator)
