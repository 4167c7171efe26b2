"""Quantizing DTensors (FSDP2, tensor parallelism) so that the result does not depend on the sharding.

``quantize(x)`` of a DTensor ``x`` is the DTensor, sharded as ``x``, whose ``full_tensor()`` is
``quantize(x.full_tensor())``, bit for bit, in every format and rounding mode:

* element-wise formats (fixed point, floats) rounded deterministically quantize each shard on
  its own rank: an element's rounding depends on it alone, so no communication is needed;
* block and scaled formats (an exponent or scale from a block's, a row's or the whole tensor's
  largest magnitude, which may span shards) and stochastic rounding (whose random bits follow
  an element's index in the full tensor) quantize the full tensor, gathered on every rank, and
  keep each rank's shard of the result. That costs an all-gather of the tensor per call (what
  FSDP itself gathers for a forward), in exchange for exactly the bits an unsharded run gets,
  whatever the placements (a block may span two shards, a row two ranks).

A ``Partial`` placement (a pending sum) is reduced first; its result is ``Replicate``.
Every rank must call with the same generator state (the plugin's generator is the same on
every rank), as for any collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_lowp.formats import FixedPoint, FloatingPoint, Format

__all__ = ["distribute_tensor", "is_dtensor", "quantize_dtensor"]

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support: no DTensor can exist
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(x, DTensor)


def quantize_dtensor(
    x: torch.Tensor, fmt: Format, rounding: str, quantize_local: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x`` (a DTensor) quantized shard-invariantly by ``quantize_local`` (a plain-tensor quantize).

    ``quantize_local`` must round with ``fmt`` and ``rounding`` (and draw from the generator
    the caller chose); it is called on the local shard or on the full tensor.
    """
    assert is_dtensor(x)
    dt: DTensor = x  # type: ignore[assignment]
    placements = tuple(dt.placements)
    elementwise = isinstance(fmt, (FixedPoint, FloatingPoint)) and rounding != "stochastic"
    if elementwise and all(isinstance(p, (Shard, Replicate)) for p in placements):
        local = quantize_local(dt.to_local())
        return DTensor.from_local(local, dt.device_mesh, placements, shape=dt.shape, stride=dt.stride())
    full = quantize_local(dt.full_tensor())
    out_placements = [Replicate() if isinstance(p, Partial) else p for p in placements]
    return distribute_tensor(full, dt.device_mesh, out_placements, src_data_rank=None)
