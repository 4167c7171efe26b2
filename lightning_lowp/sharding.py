"""Quantizing sharded tensors (FSDP2 DTensors, FSDP1 flat shards) so that the result does not depend on the sharding.

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

FSDP1 (``FullyShardedDataParallel`` with ``use_orig_params=True``, Lightning's
``strategy="fsdp"``) has no DTensors: between forward passes each original parameter is a 1-d
view of the part of it that lies in this rank's shard of a flat parameter (possibly empty),
and its gradient and optimizer state are pieces of the same extent. :func:`flat_shards` finds,
for each parameter, the full shape and where its piece starts; :func:`quantize_flat_shards_`
quantizes pieces by the rule above (element-wise formats rounded deterministically on the
piece alone; otherwise the full tensor, gathered from the pieces of every rank, quantized and
cut to the piece).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_lowp.formats import FixedPoint, FloatingPoint, Format

__all__ = [
    "FlatShard",
    "clean_name",
    "collective_device",
    "distribute_tensor",
    "flat_shards",
    "full_tensor_of_piece",
    "is_dtensor",
    "piece_of_full_tensor",
    "quantize_dtensor",
    "quantize_flat_shards_",
    "rank_counts",
]

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support: no DTensor can exist
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(x, DTensor)


def _shard_locally(fmt: Format, rounding: str) -> bool:
    """Whether ``fmt`` rounds each element by its value alone (so a shard can be quantized on its own)."""
    return isinstance(fmt, (FixedPoint, FloatingPoint)) and rounding != "stochastic"


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
    if _shard_locally(fmt, rounding) and all(isinstance(p, (Shard, Replicate)) for p in placements):
        local = quantize_local(dt.to_local())
        return DTensor.from_local(local, dt.device_mesh, placements, shape=dt.shape, stride=dt.stride())
    full = quantize_local(dt.full_tensor())
    out_placements = [Replicate() if isinstance(p, Partial) else p for p in placements]
    return distribute_tensor(full, dt.device_mesh, out_placements, src_data_rank=None)


# ---- FSDP1: flat shards -------------------------------------------------------------------


@dataclass(frozen=True)
class FlatShard:
    """Where a parameter's local piece lies in the parameter, under FSDP1 (``use_orig_params=True``).

    The piece is ``full.reshape(-1)[start : start + numel]``, a 1-d tensor of ``numel`` elements
    (``numel`` may be 0: the parameter lies in other ranks' shards).

    Attributes:
        shape: the full parameter's shape.
        start: where the piece starts in the flattened parameter.
        numel: the number of elements of the piece.
        group: the process group that shards the parameter.
    """

    shape: torch.Size
    start: int
    numel: int
    group: Any


_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_name(name: str) -> str:
    """A parameter's or module's name without the wrappers FSDP1, checkpointing and compile insert.

    ``"net.0._fsdp_wrapped_module.weight"`` is ``"net.0.weight"``, and the module
    ``"net.0._fsdp_wrapped_module"`` is ``"net.0"``: the names they have in the unwrapped model,
    so checkpoints and logs read the same under every strategy.
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def flat_shards(root: nn.Module) -> dict[torch.Tensor, FlatShard]:
    """The :class:`FlatShard` of each parameter that an FSDP1 module of ``root`` shards (``{}`` if none).

    Raises:
        ValueError: an FSDP1 module with ``use_orig_params=False``, whose optimizer steps flat
            parameters that mix several parameters (and that Lightning's FSDP strategy does not
            default to).
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return {}
    shards: dict[torch.Tensor, FlatShard] = {}
    for module in root.modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FullyShardedDataParallel) else None
        if handle is None or not handle.uses_sharded_strategy:  # no parameters of its own; NO_SHARD
            continue
        flat = handle.flat_param
        # (FlatParameter's fields, stable since torch 2.0: the original parameters, their
        # shapes and where each one's piece of this rank's shard lies)
        if flat._params is None:
            raise ValueError(
                "LowPrecision under FSDP needs use_orig_params=True (Lightning's default): with "
                "use_orig_params=False the optimizer steps flat parameters that mix several parameters"
            )
        for p, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos, strict=True):
            start = info.intra_param_start_idx if info.in_shard else 0
            numel = info.numel_in_shard if info.in_shard else 0
            shards[p] = FlatShard(torch.Size(shape), int(start), int(numel), module.process_group)
    return shards


def collective_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective of ``group`` takes tensors that live on ``device``.

    NCCL takes CUDA tensors only, and FSDP1 with CPU offload keeps its shards on the CPU.
    """
    if device.type == "cpu" and str(torch.distributed.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def rank_counts(counts: Sequence[int], device: torch.device) -> list[int]:
    """The largest of each count over all ranks (an all-reduce); ``device``: where the counts' tensors are.

    Under FSDP1 a rank whose piece of a parameter is empty gets no gradient and no optimizer
    state for it; the ranks agree on how many tensors of each parameter there are, so that
    every rank takes part in the same gathers and draws the same random keys.
    """
    if not counts:
        return []
    t = torch.tensor(list(counts), dtype=torch.int64, device=collective_device(None, device))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(c) for c in t.tolist()]


def full_tensor_of_piece(piece: torch.Tensor, shard: FlatShard) -> torch.Tensor:
    """The full tensor whose pieces the ranks of ``shard.group`` hold (an all-gather; every rank must call).

    Raises:
        ValueError: the pieces do not tile the tensor (a rank lacks a piece it should hold).
    """
    group = shard.group
    world = torch.distributed.get_world_size(group)
    device = collective_device(group, piece.device)
    extent = torch.tensor([shard.start, piece.numel()], dtype=torch.int64, device=device)
    extents = torch.empty(world * 2, dtype=torch.int64, device=device)  # (flat outputs: gloo wants them)
    torch.distributed.all_gather_into_tensor(extents, extent, group=group)
    extents = extents.view(world, 2).cpu()
    width = max(int(extents[:, 1].max()), 1)
    padded = torch.zeros(width, dtype=piece.dtype, device=device)
    padded[: piece.numel()] = piece.reshape(-1)
    gathered = torch.empty(world * width, dtype=piece.dtype, device=device)
    torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
    gathered = gathered.view(world, width).to(piece.device)
    full = torch.empty(shard.shape.numel(), dtype=piece.dtype, device=piece.device)
    covered = 0
    for rank, (start, numel) in enumerate(extents.tolist()):
        full[start : start + numel] = gathered[rank, :numel]
        covered += numel
    if covered != full.numel():
        raise ValueError(
            f"the ranks' pieces hold {covered} elements of a tensor of shape {tuple(shard.shape)} "
            f"({full.numel()} elements): a rank lacks its piece (a gradient or optimizer state that "
            "only some ranks have)"
        )
    return full.view(shard.shape)


def piece_of_full_tensor(full: torch.Tensor, shard: FlatShard) -> torch.Tensor:
    """This rank's piece of ``full`` (a view): what FSDP1 holds of it here."""
    return full.reshape(-1)[shard.start : shard.start + shard.numel]


def quantize_flat_shards_(
    tensors: Sequence[torch.Tensor],
    shards: Sequence[FlatShard | None],
    fmt: Format,
    rounding: str,
    quantize_foreach: Callable[[list[torch.Tensor], list[torch.Tensor]], None],
    sources: Sequence[torch.Tensor] | None = None,
) -> None:
    """``tensors[i] = quantize(full tensor of sources[i])``, cut to this rank's piece, for FSDP1 pieces.

    ``tensors[i]`` and ``sources[i]`` are pieces of extent ``shards[i]`` (``None``: a whole
    tensor, not sharded); ``quantize_foreach(outs, ins)`` is the plain multi-tensor quantize
    (``lp.quantize_foreach_`` with ``fmt``, ``rounding`` and the caller's generator), which draws
    one key per tensor in list order: called on the full tensors one at a time, in list order,
    it draws the keys an unsharded run draws. Every rank must call with the same list of
    parameters (see :func:`rank_counts`).
    """
    tensors = list(tensors)
    sources = tensors if sources is None else list(sources)
    if _shard_locally(fmt, rounding):
        pairs = [(t, s) for t, s in zip(tensors, sources, strict=True) if t.numel() > 0]
        if pairs:
            quantize_foreach([t for t, _ in pairs], [s for _, s in pairs])
        return
    # one full tensor at a time: a rank never holds more than one more parameter than its shard
    for t, s, shard in zip(tensors, sources, shards, strict=True):
        if shard is None:
            quantize_foreach([t], [s])
            continue
        full = full_tensor_of_piece(s, shard)
        quantize_foreach([full], [full])
        t.copy_(piece_of_full_tensor(full, shard).view_as(t))
