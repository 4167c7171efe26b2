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

"Along an axis" sets the ``dim`` of a block format: ``BlockFloatingPoint(wl, block_size=k)``
and ``ScaledFormat`` with blocks of ``k`` or ``"row"`` blocks. Element-wise formats, one
exponent or scale per tensor (``bfp(wl)``, ``block="tensor"``) and ``(rows, cols)`` tiles do not
depend on the axis: a tile covers the operand as stored (W as N×K, x as M×K, dy as M×N), so
both uses of an operand see the same tiles (NVFP4's 16x16 weight blocks).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_lowp.formats import BlockFloatingPoint, Format, FormatLike, ScaledFormat, as_format, check_rounding
from lightning_lowp.functional import quantize
from lightning_lowp.recipes import get_recipe
from lightning_lowp.selection import ModuleHookCallback

__all__ = [
    "MatmulSettings",
    "QuantizeMatmuls",
    "quantized_linear",
    "quantized_matmul",
    "QuantizedLinearFunction",
    "QuantizedMatmulFunction",
    "along",
    "OPERAND_ROLES",
]

#: The operand roles of a GEMM, each with a format and a rounding mode.
OPERAND_ROLES = ("input", "weight", "grad_output")
_SETTING_KEYS = (*OPERAND_ROLES, *(f"{role}_rounding" for role in OPERAND_ROLES))
# What QuantizeMatmuls.from_name accepts besides the recipe's name: the callback's own arguments.
_FROM_NAME_KEYS = (*_SETTING_KEYS, "modules", "names", "predicate", "overrides", "attention", "quantize_eval")


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
        input_rounding: the rounding mode of ``input``; likewise for the other roles.
        weight_rounding: the rounding mode of ``weight``.
        grad_output_rounding: the rounding mode of ``grad_output``.

    Example:
        >>> s = lp.MatmulSettings(input="mx(fp8_e4m3,32)", weight="mx(fp8_e4m3,32)", grad_output="fp8_e5m2")
    """

    input: FormatLike | None = None
    weight: FormatLike | None = None
    grad_output: FormatLike | None = None
    input_rounding: str = "nearest"
    weight_rounding: str = "nearest"
    grad_output_rounding: str = "nearest"

    def __post_init__(self) -> None:
        for role in OPERAND_ROLES:
            value = getattr(self, role)
            if value is not None:
                fmt = as_format(value, role)
                _check_operand_format(fmt, role)
                object.__setattr__(self, role, fmt)
            check_rounding(getattr(self, f"{role}_rounding"), f"{role}_rounding")

    def quantize(self, role: str, t: torch.Tensor, axis: int) -> torch.Tensor:
        """``t`` quantized in ``role``'s format with its blocks along ``axis`` (as is for ``None``)."""
        fmt = getattr(self, role)
        if fmt is None:
            return t
        return quantize(t, along(fmt, axis), getattr(self, f"{role}_rounding"))

    def __str__(self) -> str:
        parts = [f"{role}={getattr(self, role)}" for role in OPERAND_ROLES]
        parts += [f"{k}={getattr(self, k)}" for k in _SETTING_KEYS[3:] if getattr(self, k) != "nearest"]
        return f"MatmulSettings({', '.join(parts)})"


class QuantizedLinearFunction(torch.autograd.Function):
    """``F.linear`` with quantized GEMM operands: ``apply(x, weight, bias, settings)``.

    Saves the high-precision x and W (not their quantized copies), so each backward GEMM
    quantizes them afresh along its own axis.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, settings: MatmulSettings
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        y = settings.quantize("input", x2, -1) @ settings.quantize("weight", weight, -1).mT
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        settings: MatmulSettings = ctx.settings
        dy2 = dy.reshape(-1, weight.shape[0])  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dgrad: along N
            dx = (settings.quantize("grad_output", dy2, -1) @ settings.quantize("weight", weight, -2)).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # wgrad: along M
            x2 = x.reshape(-1, x.shape[-1])
            dw = settings.quantize("grad_output", dy2, -2).mT @ settings.quantize("input", x2, -2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


class QuantizedMatmulFunction(torch.autograd.Function):
    """``torch.matmul`` with quantized GEMM operands: ``apply(a, b, settings)``, a the input, b the weight.

    1-D operands are treated as ``torch.matmul`` treats them (a row, a column); broadcast batch
    dims are summed out of the gradients.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, settings: MatmulSettings) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.settings = settings
        a2 = a.unsqueeze(0) if a.dim() == 1 else a  # (…, M, K)
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b  # (…, K, N)
        y = torch.matmul(settings.quantize("input", a2, -1), settings.quantize("weight", b2, -2))
        if a.dim() == 1:
            y = y.squeeze(-2)
        if b.dim() == 1:
            y = y.squeeze(-1)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        settings: MatmulSettings = ctx.settings
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        if b.dim() == 1:
            dy = dy.unsqueeze(-1)
        if a.dim() == 1:
            dy = dy.unsqueeze(-2)  # (…, M, N)
        da = db = None
        if ctx.needs_input_grad[0]:  # along N
            da = torch.matmul(settings.quantize("grad_output", dy, -1), settings.quantize("weight", b2, -1).mT)
            da = da.sum_to_size(a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:  # along M
            db = torch.matmul(settings.quantize("input", a2, -2).mT, settings.quantize("grad_output", dy, -2))
            db = db.sum_to_size(b2.shape).reshape(b.shape)
        return da, db, None


def _check_settings(settings: object) -> None:
    if not isinstance(settings, MatmulSettings):
        raise TypeError(f"settings must be a lightning_lowp.MatmulSettings, got {type(settings).__name__}")


def quantized_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    settings: MatmulSettings | None = None,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` with its three GEMMs' operands quantized.

    Args:
        input: x, (…, K); leading dims are flattened into M.
        weight: W, (N, K).
        bias: (N,) or ``None``; added in float32 and not quantized.
        settings: the operands' formats; ``None`` is plain ``F.linear``.

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
    return QuantizedLinearFunction.apply(input, weight, bias, settings)


def quantized_matmul(a: torch.Tensor, b: torch.Tensor, settings: MatmulSettings | None = None) -> torch.Tensor:
    """``torch.matmul(a, b)`` with its GEMMs' operands quantized: a in ``input``'s format, b in ``weight``'s.

    Args:
        a: (…, M, K) (or (K,)).
        b: (…, K, N) (or (K,)); batch dims broadcast as in ``torch.matmul``.
        settings: the operands' formats; ``None`` is plain ``torch.matmul``.

    Returns:
        The product, differentiable in a and b.
    """
    if settings is None:
        return torch.matmul(a, b)
    _check_settings(settings)
    return QuantizedMatmulFunction.apply(a, b, settings)


# ---- the callback ---------------------------------------------------------------------------

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


def _plain(*tensors: object) -> bool:
    """Floating-point tensors of torch's own types (subclasses such as DTensor are left alone)."""
    return all(
        isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()
        for t in tensors
    )


class _MatmulMode(TorchFunctionMode):
    """Routes ``F.linear`` (and, with ``attention``, matmuls) to the quantized functions.

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
        name, settings = self.owner._stack[-1] if self.owner._stack else ("", None)
        if settings is not None:
            if func is F.linear:
                bound = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
                x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
                if len(bound) <= 3 and _plain(x, w) and w.dim() == 2 and (b is None or _plain(b)):  # type: ignore[union-attr]
                    self.owner.counts[(name, "linear")] += 1
                    return QuantizedLinearFunction.apply(x, w, b, settings)
            elif self.owner.attention and func in _MATMULS and not kwargs and len(args) == 2 and _plain(*args):
                self.owner.counts[(name, "matmul")] += 1
                return QuantizedMatmulFunction.apply(args[0], args[1], settings)
        return func(*args, **kwargs)


class QuantizeMatmuls(ModuleHookCallback[MatmulSettings]):
    """Quantize the operands of the matrix multiplies inside selected modules.

    Every ``F.linear`` run in a selected module's forward (that of ``nn.Linear``, and of any
    module calling it) is replaced by :func:`quantized_linear`; with ``attention=True`` also
    ``torch.matmul``, ``a @ b`` and ``torch.bmm`` (by :func:`quantized_matmul`: the left
    operand takes the ``input`` format, the right one the ``weight`` format). Parameters,
    ``state_dict`` and optimizers are untouched: the model computes in float32 with quantized
    GEMM operands. The callback picks each operand's block axis (see
    :mod:`lightning_lowp.matmuls`); a format that fixes ``dim`` is refused.

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
        modules: module types whose forward is intercepted (default ``(nn.Linear,)``); ``None``
            selects every module (narrow with ``names`` or ``predicate``).
        names: fnmatch patterns of qualified module names; each must match at least one module.
        predicate: ``predicate(name, module) -> bool``, a further filter.
        overrides: ``{pattern: {"input": ..., "weight_rounding": ..., ...}}`` per-module
            settings merged over the others, e.g. ``{"head": {"input": "bf16", "weight": "bf16",
            "grad_output": "bf16"}}``; each pattern must match a selected module.
        attention: also quantize ``torch.matmul`` / ``@`` / ``torch.bmm`` inside the selected
            modules (off by default: attention's ``q @ kᵀ`` and ``p @ v``); select the modules
            that call them (by type or name).
        quantize_eval: also quantize in validation, test and predict; ``False``: training only.
        recipe: take the formats and roundings from a registered recipe's ``matmul_*`` roles
            (as ``from_name``; handy in YAML configs).

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
        modules: Sequence[type[nn.Module]] | None = (nn.Linear,),
        names: Sequence[str] | None = None,
        predicate: Callable[[str, nn.Module], bool] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
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
        }
        if recipe is not None:
            changed = [k for k, v in given.items() if v != ("nearest" if k.endswith("rounding") else None)]
            if changed:
                raise ValueError(
                    f"give either recipe={recipe!r} or formats, not both (got {', '.join(changed)}); "
                    f"use QuantizeMatmuls.from_name({recipe!r}, {changed[0]}=...) to change a recipe"
                )
            given = _recipe_settings(recipe)
        self.settings = MatmulSettings(**given)
        if not isinstance(attention, bool):
            raise ValueError(f"attention must be True or False, got {attention!r}")
        self._init_selection(modules, names, predicate, quantize_eval)
        self.overrides = {}
        base = {k: getattr(self.settings, k) for k in _SETTING_KEYS}
        for pattern, per_module in (overrides or {}).items():
            unknown = set(per_module) - set(_SETTING_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; accepted: {', '.join(_SETTING_KEYS)}"
                )
            self.overrides[pattern] = MatmulSettings(**{**base, **per_module})
        self.attention = attention
        #: How many GEMMs were quantized, by (module name, ``"linear"`` or ``"matmul"``).
        self.counts: Counter[tuple[str, str]] = Counter()
        self._stack: list[tuple[str, MatmulSettings | None]] = []  # the selected modules now running
        self._mode: _MatmulMode | None = None

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> QuantizeMatmuls:
        """The ``matmul_*`` settings of a registered recipe (see ``lp.list_recipes()``).

        Args:
            name: a registered recipe's name, e.g. ``"mxfp8"``, ``"nvfp4"``, ``"fp8_blockwise"``.
            **kwargs: arguments of :class:`QuantizeMatmuls` other than ``recipe``: settings to
                replace (``input``, ``weight``, ``grad_output`` and their ``*_rounding``) and the
                selection (``modules``, ``names``, ``predicate``, ``overrides``, ``attention``,
                ``quantize_eval``).

        Raises:
            ValueError: for an unknown recipe or argument, naming the accepted ones.
        """
        unknown = set(kwargs) - set(_FROM_NAME_KEYS)
        if unknown:
            raise ValueError(f"unknown arguments {sorted(unknown)}; accepted: {', '.join(_FROM_NAME_KEYS)}")
        return cls(**{**_recipe_settings(name, kwargs), **kwargs})

    # ---- hooks ----------------------------------------------------------------------

    @override
    def _describe(self) -> str:
        return f"{self.settings}, attention={self.attention}"

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


def _recipe_settings(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``matmul_*`` roles of recipe ``name`` as MatmulSettings arguments.

    Raises:
        ValueError: for an unknown recipe, or one that sets no matmul operand while ``given``
            sets no format either.
    """
    r = get_recipe(name)
    settings = {k: getattr(r, f"matmul_{k}") for k in _SETTING_KEYS}
    if all(settings[role] is None for role in OPERAND_ROLES) and not any(
        (given or {}).get(role) is not None for role in OPERAND_ROLES
    ):
        raise ValueError(
            f"recipe {name!r} sets no GEMM operand (matmul_input, matmul_weight, matmul_grad_output are None); "
            "recipes for QuantizeMatmuls: mxfp8, mxfp4, nvfp4, fp8_tensorwise, fp8_rowwise, fp8_blockwise"
        )
    return settings
