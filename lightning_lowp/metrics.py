"""QuantizationMetrics: what activation quantization costs, logged while a model trains.

Two kinds of measurements, both logged through the Trainer's loggers:

* **Accuracy, quantized vs float** (validation and test): every evaluation batch is run
  through the model twice more, once with the :class:`~lightning_lowp.QuantizeActivations`
  callback quantizing and once inside its ``disabled()`` block, and both top-1 accuracies and
  their gap are accumulated in torchmetrics ``Metric`` objects (so they are synchronised
  across processes under DDP). They need a classification model; ``accuracy=False`` turns
  them off, for any other model.
* **Per-layer quantization error** (training, every ``every_n_steps`` steps): for each layer
  the ``QuantizeActivations`` callback hooked, the fraction of its output values that
  saturate, the fraction flushed to zero and the signal-to-quantization-noise ratio; and the
  same for every GEMM operand a :class:`~lightning_lowp.QuantizeMatmuls` callback quantizes
  (``fprop.input``, ``fprop.weight``, ``dgrad.grad_output``, ``dgrad.weight``,
  ``wgrad.grad_output``, ``wgrad.input`` of each hooked module).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_lowp.callbacks import QuantizeActivations
from lightning_lowp.formats import (
    BlockFloatingPoint,
    FixedPoint,
    FloatingPoint,
    Format,
    FormatLike,
    ScaledFormat,
    as_format,
)
from lightning_lowp.matmuls import QuantizeMatmuls
from lightning_lowp.reference import block_range, scaled_block_scales
from lightning_lowp.selection import named_layers

__all__ = ["QuantizationMetrics", "quantization_error_stats"]

_STAGES = {"validate": "val", "test": "test"}


# ---- per-layer statistics -----------------------------------------------------------------


def _block_limit(x: Tensor, fmt: BlockFloatingPoint) -> Tensor:
    """The largest magnitude each element's block can hold (float32, broadcastable to x)."""
    a = x.detach().abs()
    if fmt.block_size is None and x.dim() > 0:
        # A block per tensor or per index along dim: the limits follow from the block maxima
        # alone, so the float64 reference works on those (one value per block), not on x.
        finite = torch.where(torch.isfinite(a), a, 0.0)
        if fmt.dim == -1:
            a, fmt = finite.amax().reshape(1), BlockFloatingPoint(fmt.wl)
        else:
            d = fmt.dim % x.dim()
            a = finite.amax(dim=[i for i in range(x.dim()) if i != d], keepdim=True)
    return block_range(a.to(torch.float64), fmt)[1].to(torch.float32)


def _range(x: Tensor, fmt: Format) -> tuple[float | Tensor, float | Tensor]:
    """(lo, hi): the most negative and most positive value ``fmt`` can give for each element."""
    if isinstance(fmt, (FixedPoint, FloatingPoint)):
        return fmt.min_value, fmt.max_value
    if isinstance(fmt, BlockFloatingPoint):
        limit = _block_limit(x, fmt)
        return -limit, limit
    if isinstance(fmt, ScaledFormat):  # the element format's range times the block's scale
        scale = scaled_block_scales(x, fmt).to(device=x.device, dtype=torch.float32)
        hi = scale * fmt.element_max
        lo = hi * (fmt.element.min_value / fmt.element.max_value)
        return lo, hi
    raise TypeError(
        f"fmt must be FixedPoint, FloatingPoint, BlockFloatingPoint or ScaledFormat, got {type(fmt).__name__}"
    )


def _error_sums(x: Tensor, q: Tensor, fmt: Format) -> Tensor:
    """[saturated, flushed, count, signal energy, noise energy] of one tensor (float64; float32 on MPS)."""
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    with torch.no_grad():
        x = x.detach().float()  # the kernels compute on float32 values, so do the comparisons
        q = q.detach().float()
        lo, hi = _range(x, fmt)
        saturated = ((x > hi) & (q >= hi)) | ((x < lo) & (q <= lo))
        flushed = (x != 0) & (q == 0)
        finite = torch.isfinite(x)
        xs = torch.where(finite, x, 0.0)
        noise = torch.where(finite, x - q, 0.0)  # Inf where a finite value overflowed to Inf
        return torch.stack(
            [
                saturated.sum().to(acc),
                flushed.sum().to(acc),
                torch.tensor(x.numel(), dtype=acc, device=x.device),
                torch.sum(xs * xs, dtype=acc),
                torch.sum(noise * noise, dtype=acc),
            ]
        )


def _stats_from_sums(sums: Tensor) -> dict[str, float]:
    saturated, flushed, count, signal, noise = (float(v) for v in sums.tolist())
    if noise == 0:
        sqnr = math.inf  # exact (this includes an all-zero signal)
    elif signal == 0 or math.isinf(noise):
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise) if not math.isinf(signal) else math.inf
    return {"saturated": saturated / count, "flushed": flushed / count, "sqnr_db": sqnr}


def quantization_error_stats(x: Tensor, q: Tensor, fmt: FormatLike) -> dict[str, float]:
    """How ``q`` (``x`` quantized to ``fmt``) differs from ``x``: a dict of python floats.

    Fractions are of all elements (NaN included). Comparisons are made in float32, as the
    kernels compute.

    Args:
        x: the values before quantization.
        q: ``x`` quantized to ``fmt`` (same shape as ``x``).
        fmt: the format ``q`` was quantized to (a ``Format`` or a format string).

    Returns:
        A dict with these keys:

        * ``saturated``: the fraction of elements beyond the format's range whose quantized value
          is at (or past, i.e. Inf) that end: ``(x > hi and q >= hi) or (x < lo and q <= lo)``,
          where ``[lo, hi]`` is the range of values the format can give — ``±max_value`` for
          :class:`FloatingPoint`; ``[-2**(wl-1), 2**(wl-1)-1] * 2**-fl`` for :class:`FixedPoint`
          (``-lo == hi`` if symmetric, unbounded if ``clamp=False``); for
          :class:`BlockFloatingPoint` ``±(2**(E+1) - 2**(E-wl+2))`` with E the exponent of the
          element's own block (0 for a block with no nonzero finite value). ±Inf inputs count as
          saturated.
        * ``flushed``: the fraction of elements with ``x != 0`` but ``q == 0``.
        * ``sqnr_db``: ``10*log10(sum(x**2) / sum((x-q)**2))`` over the elements where x is
          finite; ``inf`` if q equals x there, ``-inf`` if a finite value overflowed to Inf.

    Raises:
        TypeError: if ``x`` or ``q`` is not a tensor.
        ValueError: if their shapes differ or ``x`` is empty.
    """
    if not isinstance(x, Tensor) or not isinstance(q, Tensor):
        raise TypeError("x and q must be tensors")
    if x.shape != q.shape:
        raise ValueError(f"x and q must have the same shape, got {tuple(x.shape)} and {tuple(q.shape)}")
    if x.numel() == 0:
        raise ValueError("x is empty")
    return _stats_from_sums(_error_sums(x, q, as_format(fmt)).cpu())


# ---- accuracy --------------------------------------------------------------------------------


class _Ratio(Metric):
    """sum(numerator) / sum(denominator) over batches and processes (integer counts)."""

    full_state_update = False
    higher_is_better = None
    numerator: Tensor
    denominator: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("numerator", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("denominator", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    @override
    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        self.numerator += numerator.to(self.numerator.device, torch.int64)
        self.denominator += denominator.to(self.denominator.device, torch.int64)

    @override
    def compute(self) -> Tensor:
        return self.numerator.to(torch.get_default_dtype()) / self.denominator


# The end of every error that says a model does not meet the accuracy's requirements.
_NOT_CLASSIFYING = (
    "the accuracies need a classification model: for any other, pass QuantizationMetrics(accuracy=False) "
    "to log the per-layer statistics only"
)


def _default_batch_fn(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "QuantizationMetrics expects each evaluation batch to be a pair (inputs, targets), got "
        f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
        f"pass batch_fn=lambda batch: (inputs, targets) for other batch layouts ({_NOT_CLASSIFYING})"
    )


def _default_forward_fn(pl_module: nn.Module, inputs: Any) -> Tensor:
    return pl_module(inputs)


def _correct(logits: object, targets: object) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise TypeError(
            "QuantizationMetrics needs forward_fn(pl_module, inputs) to return logits of shape (N, C, ...), got "
            f"{type(logits).__name__}{tuple(logits.shape) if isinstance(logits, Tensor) else ''}; "
            f"pass forward_fn=... if the module's forward returns something else ({_NOT_CLASSIFYING})"
        )
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            "QuantizationMetrics needs targets that are integer class indices, got "
            f"{targets.dtype if isinstance(targets, Tensor) else type(targets).__name__}; pass batch_fn=... to convert "
            f"({_NOT_CLASSIFYING})"
        )
    predictions = logits.argmax(dim=1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"QuantizationMetrics: predictions (logits {tuple(logits.shape)} argmax over dim 1) have shape "
            f"{tuple(predictions.shape)} but targets have shape {tuple(targets.shape)} ({_NOT_CLASSIFYING})"
        )
    return (predictions == targets.to(predictions.device)).sum()


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the CPU (and this CUDA device's) RNG state afterwards."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


# ---- the callback -----------------------------------------------------------------------------


class QuantizationMetrics(pl.Callback):
    """Logs what activation and GEMM-operand quantization costs: quantized vs float accuracy, per-layer error.

    Validation and test (``val/...``, ``test/...``), accumulated over the epoch as torchmetrics
    ``Metric`` objects (synchronised across processes):

    * ``acc_quantized``: top-1 accuracy with the :class:`QuantizeActivations` callback's
      forward quantization and the :class:`QuantizeMatmuls` callbacks' operand quantization
      applied (also when they have ``quantize_eval=False``);
    * ``acc_float``: the same weights, the same batches, with both switched off (their
      ``disabled()``);
    * ``acc_gap``: ``acc_quantized - acc_float``, a fraction in [-1, 1] (negative: quantization
      costs accuracy). Accuracies are fractions in [0, 1], not percentages.

    Training, on the batch that starts every ``every_n_steps``-th optimizer step
    (``trainer.global_step % every_n_steps == 0``: steps 0, N, 2N, ...), for every layer the
    ``QuantizeActivations`` callback hooked with a forward format:
    ``quant/<layer>/saturated``, ``quant/<layer>/flushed``, ``quant/<layer>/sqnr_db`` (see
    :func:`quantization_error_stats`), computed from the layer's float output and the value
    the hook quantized it to, summed over all calls of the layer in that batch and over all
    processes. They are written to the loggers directly at that step (like Lightning's
    ``LearningRateMonitor``, independently of ``log_every_n_steps``) and appear in
    ``trainer.callback_metrics``; :attr:`last_layer_stats` holds the latest values. With a
    :class:`QuantizeMatmuls` callback in the trainer, the same three figures are logged for
    every GEMM operand it quantized in that step, forward and backward:
    ``quant/<module>/<gemm>.<role>/...`` with ``<gemm>.<role>`` one of ``fprop.input``,
    ``fprop.weight``, ``dgrad.grad_output``, ``dgrad.weight``, ``wgrad.grad_output``,
    ``wgrad.input`` (summed over the module's GEMMs in the step; scaled formats saturate at
    the element format's largest value times the block's scale).

    The accuracies need a classification model: evaluation batches ``(inputs, targets)`` with
    ``targets`` integer class indices, and ``pl_module(inputs)`` returning logits whose argmax
    over dim 1 is the prediction (shape ``(N, C)`` or ``(N, C, ...)`` with targets
    ``(N, ...)``). Otherwise pass ``batch_fn(batch) -> (inputs, targets)`` and/or
    ``forward_fn(pl_module, inputs) -> logits``; for a model that does not classify
    (regression, ...), ``accuracy=False`` logs the per-layer statistics alone. The requirements
    are checked on the first evaluation batch the callback sees, a sanity-check batch
    included: under ``fit`` with Lightning's sanity check (``num_sanity_val_steps``, default 2)
    a model that does not meet them fails before its first training step, with an error that
    names ``accuracy=False`` (with ``num_sanity_val_steps=0``, at the first validation batch).

    Cost and side effects: each evaluation batch runs two extra forward passes (under
    ``torch.no_grad()``, in the module's current mode, with the CPU and CUDA RNG states
    restored afterwards, so training continues exactly as without this callback — also with
    stochastic rounding, whose keys come from the CPU generator; a module left in train mode
    during evaluation would update its BatchNorm statistics in those passes, as its own
    validation_step does). The per-layer statistics
    add no forward pass: forward hooks are attached only on sampled steps, one before the
    quantizer's hook (float output) and one after it (the quantized value actually used, so
    stochastic rounding is measured on the draw training used, and no random numbers are
    consumed). Without a ``QuantizeActivations`` callback in the trainer both accuracies are
    the float model's, the gap is 0 and no per-layer statistics are logged (a warning says
    so once). Sanity-check batches are not counted: the first only checks the requirements
    (one forward pass, RNG state restored).

    Args:
        every_n_steps: sample the per-layer statistics every this many optimizer steps (a
            positive int), or ``None`` to log accuracies only.
        batch_fn: ``batch_fn(batch) -> (inputs, targets)``; default: the batch is the pair.
        forward_fn: ``forward_fn(pl_module, inputs) -> logits``; default: ``pl_module(inputs)``.
        accuracy: log the quantized and float accuracies (a classification model, see above);
            ``False`` logs the per-layer statistics only and adds no evaluation passes.

    Raises:
        ValueError: for a bad ``every_n_steps``, or ``accuracy=False`` with ``every_n_steps=None``
            (nothing to log).
    """

    def __init__(
        self,
        every_n_steps: int | None = 50,
        batch_fn: Callable[[Any], tuple[Any, Tensor]] | None = None,
        forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        accuracy: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if not isinstance(accuracy, bool):
            raise ValueError(f"accuracy must be True or False, got {accuracy!r}")
        if not accuracy and every_n_steps is None:
            raise ValueError(
                "accuracy=False with every_n_steps=None leaves nothing to log; give every_n_steps a positive int "
                "(per-layer statistics) or accuracy=True (quantized vs float accuracy)"
            )
        for name, fn in (("batch_fn", batch_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        self.every_n_steps = every_n_steps
        self.accuracy = accuracy
        self.batch_fn = batch_fn or _default_batch_fn
        self.forward_fn = forward_fn or _default_forward_fn
        #: ``{layer: {"saturated": ..., "flushed": ..., "sqnr_db": ...}}`` of the latest sampled step.
        self.last_layer_stats: dict[str, dict[str, float]] = {}
        #: The global step the latest per-layer statistics were sampled at (None before any).
        self.last_sampled_step: int | None = None
        self._quantizer: QuantizeActivations | None = None
        self._matmuls: list[QuantizeMatmuls] = []
        self._warned = False
        self._checked_batch = False  # whether an evaluation batch has met the accuracy's requirements
        self._metrics: dict[tuple[str, int], dict[str, _Ratio]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sums: dict[str, Tensor] = {}
        self._sampling_step: int | None = None

    # ---- setup ----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Trainer gets `callbacks` from its CallbackConnector at run time; the class does not declare it.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        found = [cb for cb in callbacks if isinstance(cb, QuantizeActivations)]
        if len(found) > 1:
            raise ValueError(
                f"QuantizationMetrics compares against one QuantizeActivations callback; the trainer has {len(found)}"
            )
        self._quantizer = found[0] if found else None
        self._matmuls = [cb for cb in callbacks if isinstance(cb, QuantizeMatmuls)]
        self._checked_batch = False  # each run's model is checked anew
        if self._quantizer is None and not self._matmuls and not self._warned:
            self._warned = True
            rank_zero_warn(
                "QuantizationMetrics: the trainer has no QuantizeActivations callback, so "
                + (
                    "the quantized and float accuracies are the same and no per-layer statistics are logged"
                    if self.accuracy
                    else "nothing is logged (accuracy=False, and no per-layer statistics without it)"
                )
            )

    # ---- accuracy: validation and test ----------------------------------------------------------

    def _stage_metrics(self, stage: str, dataloader_idx: int, device: torch.device) -> dict[str, _Ratio]:
        key = (stage, dataloader_idx)
        if key not in self._metrics:
            self._metrics[key] = {n: _Ratio() for n in ("acc_quantized", "acc_float", "acc_gap")}
        for metric in self._metrics[key].values():
            metric.to(device)
        return self._metrics[key]

    def _reset(self, stage: str) -> None:
        for (s, _), metrics in self._metrics.items():
            if s == stage:
                for metric in metrics.values():
                    metric.reset()

    def _hook_callbacks(self) -> list[QuantizeActivations | QuantizeMatmuls]:
        """The callbacks whose quantization the float pass switches off."""
        return ([self._quantizer] if self._quantizer is not None else []) + self._matmuls

    def _logits(self, pl_module: pl.LightningModule, inputs: Any, quantized: bool) -> Tensor:
        hooked = self._hook_callbacks()
        with contextlib.ExitStack() as stack:
            for cb in hooked:
                if quantized:  # quantize in eval mode too, for this pass
                    previous = cb.quantize_eval
                    cb.quantize_eval = True
                    stack.callback(setattr, cb, "quantize_eval", previous)
                else:
                    stack.enter_context(cb.disabled())
            return self.forward_fn(pl_module, inputs)

    def _check_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Check that a batch meets the accuracy's requirements (one forward pass, nothing logged).

        Run on a sanity-check batch, so that under ``fit`` a model that does not classify fails
        before training, not at the first validation, an epoch later.
        """
        inputs, targets = self.batch_fn(batch)
        with torch.no_grad(), _preserved_rng(pl_module.device):
            _correct(self._logits(pl_module, inputs, quantized=False), targets)
        self._checked_batch = True

    def _evaluation_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int, stage: str
    ) -> None:
        if not self.accuracy:
            return
        if trainer.sanity_checking:
            if not self._checked_batch:
                self._check_batch(pl_module, batch)
            return
        inputs, targets = self.batch_fn(batch)
        with torch.no_grad(), _preserved_rng(pl_module.device):
            correct_q = _correct(self._logits(pl_module, inputs, quantized=True), targets)
            if not self._hook_callbacks():
                correct_f = correct_q
            else:
                correct_f = _correct(self._logits(pl_module, inputs, quantized=False), targets)
        total = torch.tensor(targets.numel(), device=correct_q.device)
        metrics = self._stage_metrics(stage, dataloader_idx, pl_module.device)
        metrics["acc_quantized"].update(correct_q, total)
        metrics["acc_float"].update(correct_f, total)
        metrics["acc_gap"].update(correct_q - correct_f, total)
        for name, metric in metrics.items():
            pl_module.log(
                f"{_STAGES[stage]}/{name}",
                metric,
                on_step=False,
                on_epoch=True,
                metric_attribute=f"_quantization_metrics_{stage}_{dataloader_idx}_{name}",
            )

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset("validate")

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset("test")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch(trainer, pl_module, batch, dataloader_idx, "validate")

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluation_batch(trainer, pl_module, batch, dataloader_idx, "test")

    # ---- per-layer statistics: sampled training steps -------------------------------------------

    def _layers(self) -> dict[str, Format]:
        """The hooked layers that quantize their output, with the forward format."""
        qa = self._quantizer
        if qa is None:
            return {}
        return {name: settings[0] for name, settings in qa.hooked.items() if settings[0] is not None}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        qa = self._quantizer
        if (
            self.every_n_steps is None
            or (qa is None and not self._matmuls)
            or step % self.every_n_steps != 0
            or step == self.last_sampled_step  # the later micro-batches of an accumulated step
        ):
            return
        self._remove_hooks()
        self._sums = {}
        self._sampling_step = step
        if qa is not None:
            modules = named_layers(pl_module)
            for name, fmt in self._layers().items():
                if name in modules:
                    self._attach(qa, name, modules[name], fmt)
        for qm in self._matmuls:  # the operands are seen in this step's forward and backward
            qm.observer = self._observe_operand

    def _observe_operand(self, module: str, operand: str, x: Tensor, q: Tensor, fmt: Format) -> None:
        key = f"{module}/{operand}"
        sums = _error_sums(x, q, fmt)
        self._sums[key] = sums if key not in self._sums else self._sums[key] + sums

    def _attach(self, qa: QuantizeActivations, name: str, module: nn.Module, fmt: Format) -> None:
        pending: list[Tensor | None] = []

        def before_quantizer(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            quantizes = qa.enabled and (mod.training or qa.quantize_eval)
            is_float = isinstance(output, Tensor) and output.is_floating_point()
            pending.append(output.detach() if quantizes and is_float else None)

        def after_quantizer(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = pending.pop() if pending else None
            if x is None or not isinstance(output, Tensor) or output.shape != x.shape:
                return
            sums = _error_sums(x, output, fmt)
            self._sums[name] = sums if name not in self._sums else self._sums[name] + sums

        # prepend: before QuantizeActivations' hook, so it sees the float output; the second
        # hook is registered after it, so it sees the value the quantizer returned.
        self._handles.append(module.register_forward_hook(before_quantizer, prepend=True))
        self._handles.append(module.register_forward_hook(after_quantizer))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for qm in self._matmuls:
            qm.observer = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        if self._sampling_step is None:
            return
        step, self._sampling_step = self._sampling_step, None
        self._remove_hooks()
        self.last_sampled_step = step
        # layers, then GEMM operands (sorted: every process reduces the same keys in the same order)
        names = list(self._layers()) + sorted(k for k in self._sums if k not in self._layers())
        if not names:
            return
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
        zeros = torch.zeros(5, dtype=dtype, device=pl_module.device)
        local = torch.stack([self._sums.get(n, zeros).to(pl_module.device, dtype) for n in names])
        self._sums = {}
        # every process samples the same steps and layers, so this collective always matches
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu()
        stats = {n: _stats_from_sums(total[i]) for i, n in enumerate(names) if total[i, 2] > 0}
        self.last_layer_stats = stats
        flat = {f"quant/{n}/{k}": v for n, s in stats.items() for k, v in s.items()}
        if not flat:
            return
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=step)
        for key, value in flat.items():  # callback_metrics and progress bar, not the loggers again
            pl_module.log(key, value, on_step=True, on_epoch=False, logger=False)

    # ---- cleanup --------------------------------------------------------------------------------

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._sampling_step = None
        self._sums = {}

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")
