"""Matrix products with low-precision accumulation: ``lp.matmul``.

``matmul(a, b, accumulate="fp16")`` computes ``a @ b`` the way hardware with an fp16
accumulator would: the products ``fl32(a[m, k] * b[k, n])`` are added in k order into an
accumulator held in the ``accumulate`` format, every addition rounded once, from the exact
sum, in ``accumulate_rounding``; with ``chunk=c`` the accumulator is added into a float32
accumulator every ``c`` products (promotion, as DeepSeek-V3 does every 128). The bits are
those of :func:`lightning_lowp.accumulation_reference.reference_matmul` (the contract, in its
module docstring), computed by the compiled operator ``torch.ops.lowp.matmul_accumulate``
(CPU). ``accumulate=None`` is plain ``torch.matmul``.

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
from lightning_lowp.accumulation_reference import check_accumulator
from lightning_lowp.formats import ROUNDING_MODES, FloatingPoint, FormatLike, check_rounding

__all__ = ["matmul"]


def _check_operand(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (low-precision accumulation has a CPU kernel), got {x.device}")
    if x.dim() < 2:
        shape = "(..., M, K)" if name == "a" else "(K, N) or (..., K, N)"
        raise ValueError(f"{name} must have at least 2 dims {shape}, got shape {tuple(x.shape)}")
    return x


def _check_chunk(chunk: object) -> int:
    if chunk is None:
        return 0
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    return chunk


def _accumulate(
    a: torch.Tensor, b: torch.Tensor, fmt: FloatingPoint, mode: int, chunk: int, generator: torch.Generator | None
) -> torch.Tensor:
    """The operator on a (..., M, K) and b (..., K, N), batch dims broadcast: (*batch, M, N) float32."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    count = math.prod(batch)
    a3 = a.to(torch.float32).expand(*batch, m, k).reshape(count, m, k).contiguous()
    b3 = b.to(torch.float32).expand(*batch, k, n).reshape(count, k, n).contiguous()
    kind, params = ops.kernel_args(fmt)
    out = ops.matmul_accumulate(a3, b3, kind, params, mode, chunk, generator)
    return out.reshape(*batch, m, n)


class _MatmulAccumulateFunction(torch.autograd.Function):
    """Forward: the accumulated GEMM; backward: both gradients as accumulated GEMMs."""

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        fmt: FloatingPoint,
        mode: int,
        chunk: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.settings = (fmt, mode, chunk, generator)
        return _accumulate(a, b, fmt, mode, chunk, generator)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        fmt, mode, chunk, generator = ctx.settings
        da = db = None
        if ctx.needs_input_grad[0]:
            da = _accumulate(dy, b.transpose(-2, -1), fmt, mode, chunk, generator)
            da = da.sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            db = _accumulate(a.transpose(-2, -1), dy, fmt, mode, chunk, generator)
            db = db.sum_to_size(b.shape).to(b.dtype)
        return da, db, None, None, None, None


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    accumulate: FormatLike | None = None,
    accumulate_rounding: str = "nearest",
    chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``a @ b`` with every addition of the products rounded to a low-precision accumulator.

    Args:
        a: (..., M, K), a floating-point CPU tensor (computed as float32).
        b: (K, N) or (..., K, N), a floating-point CPU tensor; batch dims broadcast as in
            ``torch.matmul``.
        accumulate: the accumulator's float format (``FloatingPoint`` or a spec such as
            ``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``); ``None``: plain ``torch.matmul``.
        accumulate_rounding: the rounding mode of every addition (one of ``lp.ROUNDING_MODES``).
        chunk: promote the accumulator into float32 every ``chunk`` products; ``None``: never.
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
    fmt = check_accumulator(accumulate, "accumulate")
    check_rounding(accumulate_rounding, "accumulate_rounding")
    chunk_len = _check_chunk(chunk)
    _check_operand(a, "a")
    _check_operand(b, "b")
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
    mode = ROUNDING_MODES.index(accumulate_rounding)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out: torch.Tensor = _MatmulAccumulateFunction.apply(a, b, fmt, mode, chunk_len, generator)
        return out
    return _accumulate(a.detach(), b.detach(), fmt, mode, chunk_len, generator)
