"""The precision plugin: weights, gradients, optimizer state and master weights in low precision."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lightning_lowp.formats import FormatLike, as_format
from lightning_lowp.functional import check_dims, quantize_foreach_
from lightning_lowp.recipes import Recipe, get_recipe
from lightning_lowp.sharding import (
    FlatShard,
    clean_name,
    collective_device,
    distribute_tensor,
    flat_shards,
    full_tensor_of_piece,
    is_dtensor,
    piece_of_full_tensor,
    quantize_flat_shards_,
    rank_counts,
)

__all__ = ["FSDPLowPrecision", "LowPrecision", "MOMENT_STATES", "NONFINITE", "NonFiniteError", "moment_states"]

#: The optimizer state tensors of torch.optim that are running estimates of (functions of) the
#: parameter's gradients or iterates, one value per element: what ``optimizer_state`` rounds.
#: SGD: momentum_buffer; Adam, AdamW, NAdam, RAdam: exp_avg, exp_avg_sq (and max_exp_avg_sq
#: with amsgrad); Adamax: exp_avg, exp_inf; RMSprop: square_avg, momentum_buffer, grad_avg;
#: Adagrad: sum; Adadelta: square_avg, acc_delta; ASGD: ax (the averaged parameter).
#: Left alone: step counters, per-parameter scalars (ASGD's eta and mu, NAdam's mu_product) and
#: per-element step sizes (Rprop's step_size, and its prev, the previous gradient's sign source).
MOMENT_STATES = frozenset(
    {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "grad_avg", "sum",
     "acc_delta", "ax"}
)  # fmt: skip


def moment_states(optimizer: Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The state tensors of ``p`` that ``optimizer_state`` quantizes.

    For optimizers of ``torch.optim``, those named in :data:`MOMENT_STATES`. For any other
    optimizer, every floating-point state tensor shaped like a parameter of at least one dim
    (a 0-d state of a 0-d parameter may be a scalar such as a learning rate: left alone).
    """
    state = optimizer.state.get(p, {})
    if type(optimizer).__module__.startswith("torch.optim"):
        return [v for k, v in state.items() if k in MOMENT_STATES and torch.is_tensor(v) and v.is_floating_point()]
    return [
        v for v in state.values() if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0 and v.shape == p.shape
    ]


def _trainable(optimizer: Optimizer) -> list[torch.Tensor]:
    """The parameters of ``optimizer`` the plugin quantizes: those that are not frozen."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


#: The accepted values of ``LowPrecision(nonfinite=...)``; the first is the default.
NONFINITE = ("skip", "error", "ignore")


class NonFiniteError(FloatingPointError):
    """A gradient or weight of a step of :class:`LowPrecision` (``nonfinite="error"``) is NaN or infinite.

    Attributes:
        name: the parameter's name in the LightningModule (``"net.0.weight"``).
        role: ``"grad"``, ``"weight"`` or ``"master_weight"``: the tensor found non-finite.
        step: the trainer's ``global_step`` at the step (``None`` outside a Trainer).
    """

    def __init__(self, message: str, name: str, role: str, step: int | None) -> None:
        super().__init__(message)
        self.name, self.role, self.step = name, role, step


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor's local shard (FSDP2), other tensors as they are.

    That is what torch's ``_foreach`` ops take (they have no DTensor rule); element-wise ops
    on matching shards are exact.
    """
    return [t.to_local() if is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]


def _all_finite(tensors: list[torch.Tensor], sharded: bool = False) -> bool:
    """Whether every value of ``tensors`` is finite: each tensor's minimum and maximum, one host sync.

    A tensor's min or max is NaN if it holds a NaN and infinite if it holds an Inf
    (``torch.aminmax``: one vectorised pass, several times faster here than an inf-norm or
    ``isfinite().all()``). Sharded tensors (DTensors, or FSDP1 pieces: ``sharded=True``) are
    checked shard by shard and the answer agreed by every rank (an all-reduce), so that all
    ranks skip a step, or none.
    """
    sharded = sharded or any(is_dtensor(t) for t in tensors)
    tensors = [t for t in _local(tensors) if t.numel() > 0]
    finite = True
    if tensors:
        device = tensors[0].device
        extremes = torch.stack([torch.stack(torch.aminmax(t)).float().to(device) for t in tensors])
        finite = bool(extremes.isfinite().all())
    if sharded and torch.distributed.is_initialized():
        device = collective_device(None, tensors[0].device if tensors else torch.device("cpu"))
        flag = torch.tensor([0 if finite else 1], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = not bool(flag.item())
    return finite


def _rank_counts(params: list[torch.Tensor], counts: list[int]) -> list[int]:
    """:func:`rank_counts` of one count per parameter, on the parameters' device."""
    return rank_counts(counts, params[0].device if params else torch.device("cpu"))


# The names a checkpoint keeps the plugin's state under (the class's, as Lightning does).
_CHECKPOINT_NAMES = ("LowPrecision", "FSDPLowPrecision")

# The roles of the plugin: each quantizes tensors shaped like a parameter.
_ROLES = ("weight", "grad", "optimizer_state", "master_weight")

# The recipe fields this plugin uses (activations and errors belong to QuantizeActivations).
_ARGUMENTS = (
    "weight",
    "grad",
    "optimizer_state",
    "master_weight",
    "weight_rounding",
    "grad_rounding",
    "optimizer_state_rounding",
    "master_weight_rounding",
)


class LowPrecision(Precision):
    """Simulate training with weights, gradients, optimizer state and master weights in low precision.

    QPyTorch's ``OptimLP``, as a Lightning precision plugin. Around each optimizer step, in
    this order (the order of ``OptimLP``):

    1. the gradients, after Lightning's accumulation and clipping, are multiplied by
       ``grad_scale`` and quantized to ``grad``;
    2. with ``master_weight``, each weight is replaced by its master copy;
    3. the optimizer steps (any torch optimizer that does not re-evaluate its closure);
    4. with ``master_weight``, the updated weight is quantized to ``master_weight`` and kept
       as the master copy;
    5. the weight is quantized to ``weight``;
    6. the optimizer's moment estimates (SGD momentum, Adam's ``exp_avg`` and ``exp_avg_sq``,
       RMSprop's ``square_avg``, ...; see :func:`moment_states`) are quantized to
       ``optimizer_state``; step counters and scalars such as ASGD's ``eta`` are not.

    Each role is one multi-tensor call over all parameters (:func:`lp.quantize_foreach_`),
    in place; after the first step (which allocates the master weights) the quantization
    allocates no tensors. ``None`` leaves a role in float32. Formats are format objects or spec strings;
    ``recipe="bfp8"`` (or ``LowPrecision.from_name("bfp8")``) takes them from a registered
    recipe. Stochastic rounding draws from a generator the plugin owns, seeded from torch's
    seed and broadcast from rank 0, so every rank rounds alike; its state and the master weights
    are saved in checkpoints, so a resumed run continues bit for bit.

    Parameters with ``requires_grad=False`` are frozen: the plugin leaves them alone in every
    role (their values, gradients and optimizer state; no master copy is made), also when they
    are in the optimizer.

    After the step, the gradients (as quantized in 1.), the weights and the master weights are
    checked for NaN and infinity, in one multi-tensor call with one host sync; ``nonfinite``
    says what a non-finite value does: ``"skip"`` (the default, as AMP's ``GradScaler``) undoes
    the step: every weight, master weight and optimizer state is restored bit for bit, as if
    the step had not been taken (the plugin keeps a copy of them, taken before each step, to
    that end: memory for one more copy, one multi-tensor copy a step), a warning names the first
    parameter and role found and training goes on; ``"error"`` raises :class:`NonFiniteError`
    naming them (the weights are left as the step made them); ``"ignore"`` checks nothing (the
    behaviour of float training: one NaN gradient turns the weights NaN). The steps found
    non-finite are counted in :attr:`nonfinite_steps`, saved in checkpoints and, from the first
    on, logged as ``"lowp/nonfinite_steps"``. Every DDP rank decides alike, as the gradients are
    averaged across ranks and the weights are the same on every rank.

    Every role's format must apply to every trainable parameter of the optimizer: a block
    format's ``dim`` (``bfp(8,dim=1)``, ``mx(fp8_e4m3,32,dim=1)``) must be one the parameter
    has, and a scaled format's ``(rows, cols)`` tile needs 2 or more dims; so neither applies
    to a bias. This is checked when training starts (for a parameter the optimizer gains or
    that is unfrozen later, before its first step), with a ``ValueError`` naming the role and
    the parameter.

    Args:
        weight: the format of the weights the model computes with.
        grad: the format of the weight gradients, before the optimizer step.
        optimizer_state: the format of the optimizer's state tensors shaped like their parameter.
        master_weight: the format of the master copy of each weight that the optimizer
            updates; ``None`` steps the quantized weights themselves.
        weight_rounding: the rounding mode of ``weight``.
        grad_rounding: the rounding mode of ``grad``.
        optimizer_state_rounding: the rounding mode of ``optimizer_state``.
        master_weight_rounding: the rounding mode of ``master_weight``.
        grad_scale: a factor applied to the gradients before they are quantized.
        recipe: a registered recipe's name, instead of the formats.
        nonfinite: what a step with a non-finite gradient or weight does: ``"skip"`` (undo
            it), ``"error"`` (raise :class:`NonFiniteError`) or ``"ignore"`` (no check).

    Example:
        >>> trainer = L.Trainer(plugins=[lp.LowPrecision.from_name("bfp8")])
    """

    precision = "32-true"  # the arithmetic itself stays float32

    def __init__(
        self,
        weight: FormatLike | None = None,
        grad: FormatLike | None = None,
        optimizer_state: FormatLike | None = None,
        master_weight: FormatLike | None = None,
        weight_rounding: str = "nearest",
        grad_rounding: str = "nearest",
        optimizer_state_rounding: str = "nearest",
        master_weight_rounding: str = "nearest",
        grad_scale: float = 1.0,
        recipe: str | None = None,
        nonfinite: str = "skip",
    ) -> None:
        given: dict[str, Any] = {
            "weight": weight,
            "grad": grad,
            "optimizer_state": optimizer_state,
            "master_weight": master_weight,
            "weight_rounding": weight_rounding,
            "grad_rounding": grad_rounding,
            "optimizer_state_rounding": optimizer_state_rounding,
            "master_weight_rounding": master_weight_rounding,
        }
        if recipe is not None:
            changed = [k for k, v in given.items() if v != ("nearest" if k.endswith("rounding") else None)]
            if changed:
                raise ValueError(
                    f"give either recipe={recipe!r} or formats, not both (got {', '.join(changed)}); "
                    f"use LowPrecision.from_name({recipe!r}, {changed[0]}=...) to change a recipe"
                )
            base = get_recipe(recipe)
            self.recipe = Recipe(**{k: getattr(base, k) for k in _ARGUMENTS})
        else:
            self.recipe = Recipe(**given)  # validates formats and rounding modes
        if not isinstance(grad_scale, (int, float)) or isinstance(grad_scale, bool) or grad_scale <= 0:
            raise ValueError(f"grad_scale must be a positive number, got {grad_scale!r}")
        self.grad_scale = float(grad_scale)
        if not isinstance(nonfinite, str) or nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}; got {nonfinite!r}")
        self.nonfinite = nonfinite
        #: The steps found with a non-finite gradient or weight (skipped, or the one that raised).
        self.nonfinite_steps = 0
        self.generator = torch.Generator()
        self._seeded = False
        self._module: nn.Module | None = None
        self._shards: dict[torch.Tensor, FlatShard] = {}  # under FSDP1: each parameter's piece
        self._master_weights: dict[torch.Tensor, torch.Tensor] = {}
        self._checked: set[torch.Tensor] = set()  # parameters whose shapes suit every role's format
        self._pending_state: dict[str, Any] | None = None
        # with nonfinite="skip": the copies that undo a step, kept from one step to the next
        self._copies: dict[torch.Tensor, torch.Tensor] = {}
        self._saved: tuple[list[torch.Tensor], list[torch.Tensor], set[torch.Tensor], dict[Any, dict[str, Any]]] = (
            [], [], set(), {},
        )  # fmt: skip

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LowPrecision:
        """The plugin for a registered recipe (``lp.list_recipes()``).

        Args:
            name: a registered recipe's name.
            **overrides: single roles to replace, e.g.
                ``from_name("bfp8", grad_rounding="stochastic", master_weight=None)``, and
                ``grad_scale`` and ``nonfinite``.
        """
        grad_scale = overrides.pop("grad_scale", 1.0)
        nonfinite = overrides.pop("nonfinite", NONFINITE[0])
        unknown = set(overrides) - set(_ARGUMENTS)
        if unknown:
            raise ValueError(
                f"unknown arguments {sorted(unknown)}; accepted: {', '.join(_ARGUMENTS)}, grad_scale, nonfinite"
            )
        recipe = dataclasses.replace(get_recipe(name), **overrides)
        return cls(**{k: getattr(recipe, k) for k in _ARGUMENTS}, grad_scale=grad_scale, nonfinite=nonfinite)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.recipe}, grad_scale={self.grad_scale}, nonfinite={self.nonfinite!r})"

    # ---- Lightning hooks --------------------------------------------------------------

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        # Every strategy calls this with the LightningModule of the run that starts, before it
        # restores a checkpoint: the plugin's state belongs to that model from here on.
        if isinstance(module, pl.LightningModule):
            self._bind(module)
        return super().convert_module(module)

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        # the model as the strategy wrapped it: under FSDP1, where each parameter's piece lies
        self._shards = flat_shards(model)
        for optimizer in optimizers:
            inner = getattr(optimizer, "optimizer", optimizer)
            if isinstance(inner, LBFGS):
                raise ValueError(
                    "LowPrecision does not support LBFGS: it re-evaluates its closure inside step(), between "
                    "which the plugin could not quantize; use an optimizer that steps once per closure"
                )
            # here, when training starts, rather than at the first step, after a whole batch
            self._check_shapes(_trainable(inner))
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def optimizer_step(  # type: ignore[override]  # the same as Lightning's own Precision.optimizer_step
        self,
        optimizer: Optimizer,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        if not isinstance(model, pl.LightningModule):
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        self._prepare(model)
        closure_result = self._wrap_closure(model, optimizer, closure)  # forward, backward, clipping
        params = _trainable(optimizer)
        if not self._checked.issuperset(params):  # a parameter added or unfrozen since the start
            self._check_shapes(params)
        if self.nonfinite == "skip":
            with torch.profiler.record_function("LowPrecision.save"):
                self._save(optimizer, params)
        with torch.profiler.record_function("LowPrecision.before_step"):
            self._before_step(params)
        result = optimizer.step(**kwargs)
        with torch.profiler.record_function("LowPrecision.after_step"):
            self._after_step(optimizer, params)
        if self.nonfinite != "ignore":
            with torch.profiler.record_function("LowPrecision.check_finite"):
                self._check_finite(model, optimizer, params)
        return closure_result if result is None else result

    # Each role is one multi-tensor call over all parameters, in place: no per-tensor trips
    # through Python, no temporaries (the master weights are allocated once, at the first step).

    @torch.no_grad()
    def _before_step(self, params: list[torch.Tensor]) -> None:
        r = self.recipe
        owners, grads = self._grads(params)
        if grads and self.grad_scale != 1.0:
            torch._foreach_mul_(_local(grads), self.grad_scale)
        if grads and r.grad is not None:
            self._quantize(grads, owners, r.grad, r.grad_rounding)
        if r.master_weight is not None:
            torch._foreach_copy_(_local(params), _local([self._master_weight(p) for p in params]))

    @torch.no_grad()
    def _after_step(self, optimizer: Optimizer, params: list[torch.Tensor]) -> None:
        r = self.recipe
        if r.master_weight is not None:
            masters = [self._master_weights[p] for p in params]
            self._quantize(masters, params, r.master_weight, r.master_weight_rounding, sources=params)
            if r.weight is not None:
                self._quantize(params, params, r.weight, r.weight_rounding, sources=masters)
            else:
                torch._foreach_copy_(_local(params), _local(masters))
        elif r.weight is not None:
            self._quantize(params, params, r.weight, r.weight_rounding)
        if r.optimizer_state is not None:
            owners, states = self._states(optimizer, params)
            self._quantize(states, owners, r.optimizer_state, r.optimizer_state_rounding)

    def _quantize(
        self,
        tensors: list[torch.Tensor],
        owners: list[torch.Tensor],
        fmt: FormatLike | None,
        rounding: str,
        sources: list[torch.Tensor] | None = None,
    ) -> None:
        """``tensors[i] = quantize(sources[i])`` in place; ``owners[i]`` is the parameter ``tensors[i]`` belongs to."""
        assert fmt is not None
        g = self.generator
        if not self._shards:
            quantize_foreach_(tensors, fmt, rounding, g, sources=sources)
            return

        def quantize(outs: list[torch.Tensor], ins: list[torch.Tensor]) -> None:
            quantize_foreach_(outs, fmt, rounding, g, sources=ins)

        shards = [self._shards.get(p) for p in owners]
        quantize_flat_shards_(tensors, shards, as_format(fmt), rounding, quantize, sources=sources)

    def _grads(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters that have a gradient, and their gradients.

        Under FSDP1 a rank whose piece of a parameter is empty has no gradient for it: it takes
        an empty one where another rank has one, so that every rank quantizes the same list.
        """
        if not self._shards:
            owners = [p for p in params if p.grad is not None]
            return owners, [p.grad for p in owners]  # type: ignore[misc]
        counts = _rank_counts(params, [int(p.grad is not None) for p in params])
        owners = [p for p, c in zip(params, counts, strict=True) if c]
        return owners, [p.grad if p.grad is not None else p.new_empty(0) for p in owners]

    def _states(
        self, optimizer: Optimizer, params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameter of each :func:`moment_states` tensor, and the tensors (as :meth:`_grads`, under FSDP1)."""
        per_param = [moment_states(optimizer, p) for p in params]
        if self._shards:
            counts = _rank_counts(params, [len(s) for s in per_param])
            for i, (p, count) in enumerate(zip(params, counts, strict=True)):
                if not per_param[i]:  # the optimizer has not stepped this rank's (empty) piece
                    per_param[i] = [p.new_empty(0) for _ in range(count)]
        owners = [p for p, states in zip(params, per_param, strict=True) for _ in states]
        return owners, [s for states in per_param for s in states]

    # ---- non-finite values ------------------------------------------------------------

    @torch.no_grad()
    def _save(self, optimizer: Optimizer, params: list[torch.Tensor]) -> None:
        """Copy what a step changes (weights, master weights, optimizer state) so that :meth:`_restore` can undo it.

        The copies are allocated at the first step and reused: one multi-tensor copy a step.
        """
        sources = list(params)
        had_master = {p for p in params if p in self._master_weights}
        sources += [self._master_weights[p] for p in params if p in had_master]
        states: dict[Any, dict[str, Any]] = {}
        for p in params:
            if p in optimizer.state:  # (a defaultdict: `in` does not add p)
                states[p] = dict(optimizer.state[p])  # the values, tensors and plain ones, as they are now
                sources += [v for v in states[p].values() if torch.is_tensor(v)]
        copies = []
        for t in sources:
            c = self._copies.get(t)
            if c is None or c.shape != t.shape or c.dtype != t.dtype or c.device != t.device:
                c = torch.empty_like(t)
            copies.append(c)
        self._copies = dict(zip(sources, copies, strict=True))  # forgets the copies of tensors gone since
        if sources:
            torch._foreach_copy_(_local(copies), _local(sources))
        self._saved = (sources, copies, had_master, states)

    @torch.no_grad()
    def _restore(self, optimizer: Optimizer, params: list[torch.Tensor]) -> None:
        """Undo the step since :meth:`_save`: the same tensors, with the same values, in the same places."""
        sources, copies, had_master, states = self._saved
        if sources:
            torch._foreach_copy_(_local(sources), _local(copies))
        for p in params:
            if p not in had_master:  # made by this step: made again, from the restored weight, at the next
                self._master_weights.pop(p, None)
            if p not in states:  # the optimizer's state of p begins at its next step
                optimizer.state.pop(p, None)
            else:
                state = optimizer.state[p]
                state.clear()
                state.update(states[p])

    @torch.no_grad()
    def _check_finite(self, model: pl.LightningModule, optimizer: Optimizer, params: list[torch.Tensor]) -> None:
        """After a step: count, and skip or raise on, a non-finite gradient, weight or master weight."""
        grads = [p.grad for p in params if p.grad is not None]
        masters = [self._master_weights[p] for p in params if p in self._master_weights]
        if not _all_finite(grads + params + masters, sharded=bool(self._shards)):
            name, role, what = self._find_nonfinite(params)
            self.nonfinite_steps += 1
            step = model.trainer.global_step if model._trainer is not None else None
            fmt = getattr(self.recipe, role)
            where = f"{role} of parameter {name!r}"
            said = (
                f"{where} holds {what}"
                + ("" if fmt is None else f" after quantizing to {role}={fmt}")
                + ("" if step is None else f" at step {step}")
            )
            if self.nonfinite == "error":
                raise NonFiniteError(
                    f"LowPrecision: the {said}. Lower the learning rate or grad_scale, use a format of a wider "
                    "range, or pass nonfinite='skip' to skip such steps (as AMP's GradScaler does)",
                    name,
                    role,
                    step,
                )
            self._restore(optimizer, params)
            rank_zero_warn(f"LowPrecision skipped a step: the {where} was not finite (nonfinite='skip')")
        if self.nonfinite_steps:
            self._log(model)

    @torch.no_grad()
    def _find_nonfinite(self, params: list[torch.Tensor]) -> tuple[str, str, str]:
        """The name, role and content of the first non-finite tensor: gradients first (the cause), then weights."""
        names = self._names()
        found = [("grad", p, p.grad) for p in params if p.grad is not None]
        found += [("weight", p, p) for p in params]
        found += [("master_weight", p, self._master_weights[p]) for p in params if p in self._master_weights]
        for role, p, t in found:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                nan = int(torch.isnan(t).sum())
                return names.get(p, "?"), role, f"{nan} NaN and {bad - nan} infinite of {t.numel()} values"
        if self._shards:  # FSDP1: the non-finite values are in another rank's pieces
            return "(in another rank's shard)", "grad", "non-finite values"
        raise AssertionError("unreachable: the check found a non-finite value")

    def _log(self, model: pl.LightningModule) -> None:
        """Log :attr:`nonfinite_steps` as ``"lowp/nonfinite_steps"``, where the LightningModule can log."""
        trainer = model._trainer
        if trainer is None or trainer.barebones or trainer._results is None or model._current_fx_name is None:
            return
        model.log("lowp/nonfinite_steps", float(self.nonfinite_steps))

    # ---- state ------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._module is None:
            return {**(self._pending_state or {}), "nonfinite_steps": self.nonfinite_steps}
        names = self._names()
        return {
            "generator": self.generator.get_state(),
            # sharded (FSDP2, FSDP1) master weights as full tensors, named as in the unwrapped
            # model: the checkpoint is one rank's (a collective: every rank builds the
            # checkpoint), and any sharding can load it
            "master_weights": {names[p]: self._full(p, m) for p, m in self._master_weights.items() if p in names},
            "nonfinite_steps": self.nonfinite_steps,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning keeps a precision plugin's state under its class name, and loads it (right
        # after this hook) only into a plugin of that name: a checkpoint of LowPrecision (DDP,
        # FSDP2, one device) would not restore FSDPLowPrecision (FSDP1), nor the other way round.
        own = type(self).__qualname__
        if own not in checkpoint:
            for name in _CHECKPOINT_NAMES:
                if name in checkpoint:
                    self.load_state_dict(checkpoint[name])
                    break

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))  # 0 from a checkpoint that predates it
        self._pending_state = dict(state_dict)  # applied at the next step, when the parameters are known
        if self._module is not None:
            self._apply_pending()

    # ---- helpers ----------------------------------------------------------------------

    def _names(self) -> dict[torch.Tensor, str]:
        """Each parameter's name in the unwrapped LightningModule (FSDP1's wrappers left out)."""
        if self._module is None:
            return {}
        return {p: clean_name(n) for n, p in self._module.named_parameters()}

    def _full(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t``, a tensor of parameter ``p``'s extent, as a full tensor (a collective where it is sharded)."""
        if is_dtensor(t):
            return t.full_tensor()  # type: ignore[attr-defined]
        if p in self._shards:
            return full_tensor_of_piece(t, self._shards[p])
        return t.clone()

    def _bind(self, module: nn.Module) -> None:
        """Make ``module`` the model whose master weights this plugin keeps, forgetting another's."""
        if module is not self._module:
            self._module = module
            self._master_weights = {}
            self._checked = set()
            self._shards = {}

    def _check_shapes(self, params: list[torch.Tensor]) -> None:
        """Check that every role's format applies to each parameter (see the class docstring).

        Raises:
            ValueError: naming the role, its format, the parameter and its shape.
        """
        names = self._names()
        for role in _ROLES:
            fmt = getattr(self.recipe, role)
            if fmt is None:
                continue
            for p in params:
                shape = self._shards[p].shape if p in self._shards else p.shape  # FSDP1: the full shape
                try:
                    check_dims(fmt, len(shape), "the parameter")
                except ValueError as err:
                    what = f"parameter {names[p]!r}" if p in names else "a parameter"
                    raise ValueError(
                        f"LowPrecision: {role}={fmt} does not apply to {what} of shape {tuple(shape)}: {err}. "
                        f"A role's format must apply to every trainable parameter of the optimizer: give {role} "
                        "one that does (a block dim of 0 or -1; for a scaled format, blocks of k elements, 'row' "
                        f"or 'tensor' rather than a (rows, cols) tile), or leave {what} out of the optimizer or "
                        "freeze it (requires_grad=False), which LowPrecision leaves alone"
                    ) from err
        self._checked.update(params)

    def _prepare(self, module: pl.LightningModule) -> None:
        self._bind(module)
        if not self._seeded:
            # derived from torch's seed (a stream of its own), the same on every rank
            seed = (torch.initial_seed() * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63
            strategy = module.trainer.strategy if module._trainer is not None else None
            if strategy is not None:
                seed = int(strategy.broadcast(seed, src=0))
            self.generator.manual_seed(seed)
            self._seeded = True
        if self._pending_state is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        state, self._pending_state = self._pending_state or {}, None
        assert self._module is not None, "called once the module is known"
        if "generator" in state:
            self.generator.set_state(state["generator"])
            self._seeded = True
        params = {n: p for p, n in self._names().items()}
        for name, master in state.get("master_weights", {}).items():
            if name not in params:
                raise ValueError(f"checkpoint has a master weight for {name!r}, which the model does not have")
            p = params[name]
            if is_dtensor(p) and not is_dtensor(master):  # a full tensor: this rank's shard of it
                master = distribute_tensor(master, p.device_mesh, p.placements, src_data_rank=None)  # type: ignore[attr-defined]
            elif p in self._shards:  # FSDP1: this rank's piece of it
                master = piece_of_full_tensor(master, self._shards[p])
            self._master_weights[p] = master.to(device=p.device, dtype=p.dtype).clone()

    def _master_weight(self, p: torch.Tensor) -> torch.Tensor:
        master = self._master_weights.get(p)
        if master is None:  # as OptimLP: the master copy starts as the (unquantized) initial weight
            master = self._master_weights[p] = p.detach().clone()
        return master


class FSDPLowPrecision(LowPrecision, FSDPPrecision):  # type: ignore[misc]  # (optimizer_step: Lightning's own mismatch)
    """:class:`LowPrecision` for Lightning's FSDP strategy (``strategy="fsdp"``, FSDP1).

    Lightning's ``FSDPStrategy`` takes only a precision plugin that is an ``FSDPPrecision``;
    this is one, in float32 (``"32-true"``), with everything of :class:`LowPrecision`: the same
    arguments, recipes (``FSDPLowPrecision.from_name("bfp8")``) and checkpoints (whole master
    weights, named as in the unwrapped model, so a checkpoint moves between FSDP1, FSDP2, DDP
    and one device). Every role is shard-invariant: a rank quantizes its pieces of the
    parameters (element-wise formats to nearest), or gathers each full tensor, quantizes it
    and keeps its piece (block and scaled formats, stochastic rounding), so a run takes the
    bits of an unsharded one. FSDP1 must keep the original parameters
    (``use_orig_params=True``, Lightning's default). As with Lightning's own ``FSDPPrecision``,
    ``gradient_clip_algorithm="norm"`` is not supported.

    Under ``ModelParallelStrategy`` (FSDP2), DDP or one device, use :class:`LowPrecision`.

    Example:
        >>> trainer = L.Trainer(strategy="fsdp", plugins=[lp.FSDPLowPrecision.from_name("bfp8")])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        LowPrecision.__init__(self, *args, **kwargs)
        FSDPPrecision.__init__(self, "32-true")
