"""Lightning callbacks: where and when activations and errors are quantized."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_lowp.autograd import QuantizeFunction, resolve_formats
from lightning_lowp.formats import Format, FormatLike
from lightning_lowp.recipes import get_recipe

__all__ = ["QuantizeActivations", "ActivationSettings", "DEFAULT_MODULES"]

#: The layers the seed notebook quantizes after: convolutions, linear layers, pooling.
DEFAULT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


def _map_float_tensors(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` with ``fn`` applied to every floating-point tensor in it.

    Through tuples (named ones included), lists and dicts; anything else is kept as is.
    """
    if isinstance(output, torch.Tensor):
        return fn(output) if output.is_floating_point() else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple, e.g. PackedSequence
        return type(output)(*(_map_float_tensors(o, fn) for o in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_map_float_tensors(o, fn) for o in output)
    if isinstance(output, dict):
        return type(output)((k, _map_float_tensors(v, fn)) for k, v in output.items())
    return output


_OVERRIDE_KEYS = ("forward", "backward", "forward_rounding", "backward_rounding")
# What QuantizeActivations.from_name accepts besides the recipe's name: the callback's own arguments.
_FROM_NAME_KEYS = (*_OVERRIDE_KEYS, "modules", "names", "predicate", "overrides", "quantize_eval")


class ActivationSettings(NamedTuple):
    """How one module's output is quantized: the format and rounding of each direction."""

    forward: Format | None
    backward: Format | None
    forward_rounding: str
    backward_rounding: str

    @classmethod
    def resolve(
        cls,
        forward: FormatLike | None,
        backward: FormatLike | None,
        forward_rounding: str,
        backward_rounding: str,
    ) -> ActivationSettings:
        """Validated settings, spec strings parsed (see :func:`lightning_lowp.autograd.resolve_formats`)."""
        fwd, bwd = resolve_formats(forward, backward, forward_rounding, backward_rounding)
        return cls(fwd, bwd, forward_rounding, backward_rounding)


class QuantizeActivations(pl.Callback):
    """Quantize the outputs of selected modules (activations) and the gradients into them (errors).

    Hooks are attached when fit, validate, test or predict starts and removed when it ends
    (also after an error). The selection is checked then, before any step runs: a pattern that
    matches no module is an error, and a selection of no module at all a ``UserWarning``. Every
    floating-point tensor a hooked module returns is quantized, through tuples, lists and dicts:
    an ``nn.LSTM``'s output and its ``(h_n, c_n)``, an ``nn.MultiheadAttention``'s output and,
    when it returns them, its attention weights.

    Args:
        forward: the format (object or spec string) of activations; ``None`` leaves them in float32.
        backward: the format of errors, the gradients flowing back into the outputs; ``None``
            leaves them in float32.
        forward_rounding: the rounding mode of activations.
        backward_rounding: the rounding mode of errors.
        modules: module types to hook (default: convolutions, linear layers, pooling);
            ``None`` selects every module (then narrow with ``names`` or ``predicate``).
        names: fnmatch patterns of qualified module names (``"features.*"``); a module is
            hooked if it matches any. Each pattern must match at least one module.
        predicate: ``predicate(name, module) -> bool``, a further filter.
        overrides: ``{pattern: {"forward": ..., "backward": ..., ...}}`` per-module settings,
            e.g. ``{"conv1": {"forward": None}}`` keeps the first layer's output in float32.
        quantize_eval: also quantize during validation, test and predict (the seed's
            low-precision inference); ``False`` quantizes in training only.
        recipe: take forward/backward formats and roundings from a registered recipe
            (the same as ``from_name``; handy in YAML configs); to change one of them, use
            ``from_name(recipe, backward_rounding=...)``.

    Example:
        >>> trainer = L.Trainer(callbacks=[lp.QuantizeActivations.from_name("bfp8")])
    """

    def __init__(
        self,
        forward: FormatLike | None = None,
        backward: FormatLike | None = None,
        forward_rounding: str = "nearest",
        backward_rounding: str = "nearest",
        modules: Sequence[type[nn.Module]] | None = DEFAULT_MODULES,
        names: Sequence[str] | None = None,
        predicate: Callable[[str, nn.Module], bool] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        quantize_eval: bool = True,
        recipe: str | None = None,
    ) -> None:
        super().__init__()
        if recipe is not None:
            if (forward, backward, forward_rounding, backward_rounding) != (None, None, "nearest", "nearest"):
                raise ValueError(
                    f"give either recipe={recipe!r} or forward/backward formats, not both; use "
                    f"QuantizeActivations.from_name({recipe!r}, backward_rounding=...) to change a recipe"
                )
            r = get_recipe(recipe)
            forward, backward = r.activation, r.error
            forward_rounding, backward_rounding = r.activation_rounding, r.error_rounding
        self.settings = ActivationSettings.resolve(forward, backward, forward_rounding, backward_rounding)
        if modules is not None:
            modules = tuple(modules)
            bad = [m for m in modules if not (isinstance(m, type) and issubclass(m, nn.Module))]
            if bad:
                raise TypeError(f"modules must be nn.Module subclasses, got {bad}")
        if isinstance(names, str):
            names = [names]
        self.module_types = modules
        self.names = list(names) if names is not None else None
        self.predicate = predicate
        self.overrides: dict[str, ActivationSettings] = {}
        for pattern, settings in (overrides or {}).items():
            unknown = set(settings) - set(_OVERRIDE_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; accepted: {', '.join(_OVERRIDE_KEYS)}"
                )
            merged = {**self.settings._asdict(), **settings}
            self.overrides[pattern] = ActivationSettings.resolve(**merged)
        self.quantize_eval = quantize_eval
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attached = False  # (also with no module selected, when there are no handles)
        self.hooked: dict[str, ActivationSettings] = {}

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> QuantizeActivations:
        """The activation and error settings of a registered recipe (see ``lp.list_recipes()``).

        As :meth:`LowPrecision.from_name <lightning_lowp.LowPrecision.from_name>`, the recipe's
        settings can be changed one by one.

        Args:
            name: a registered recipe's name.
            **kwargs: arguments of :class:`QuantizeActivations` other than ``recipe``: the
                recipe's settings to replace (``forward``, ``backward``, ``forward_rounding``,
                ``backward_rounding``), e.g. ``from_name("bfp8", backward_rounding="stochastic")``,
                and the selection (``modules``, ``names``, ``predicate``, ``overrides``,
                ``quantize_eval``).

        Raises:
            ValueError: for an unknown recipe or argument, naming the accepted ones.
        """
        unknown = set(kwargs) - set(_FROM_NAME_KEYS)
        if unknown:
            raise ValueError(f"unknown arguments {sorted(unknown)}; accepted: {', '.join(_FROM_NAME_KEYS)}")
        r = get_recipe(name)
        settings: dict[str, Any] = {
            "forward": r.activation,
            "backward": r.error,
            "forward_rounding": r.activation_rounding,
            "backward_rounding": r.error_rounding,
        }
        return cls(**{**settings, **kwargs})

    # ---- selection ------------------------------------------------------------------

    def select(self, model: nn.Module) -> dict[str, ActivationSettings]:
        """The modules this callback hooks in ``model``, by name, with their settings."""
        named = [(n, m) for n, m in model.named_modules() if n]  # the root is not a layer
        for pattern in (self.names or []) + list(self.overrides):
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(
                    f"module pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"its modules are: {', '.join(n for n, _ in named) or '(none)'}"
                )
        selected: dict[str, ActivationSettings] = {}
        for name, module in named:
            if self.module_types is not None and not isinstance(module, self.module_types):
                continue
            if self.names is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.names):
                continue
            if self.predicate is not None and not self.predicate(name, module):
                continue
            settings = self.settings
            for pattern, per_module in self.overrides.items():
                if fnmatch.fnmatchcase(name, pattern):
                    settings = per_module
            selected[name] = settings
        return selected

    # ---- attaching and removing hooks -----------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Hook the selected modules of ``model`` (nothing happens when already attached)."""
        if self._attached:
            return
        self.hooked = self.select(model)
        self._attached = True
        modules = dict(model.named_modules())
        for name, settings in self.hooked.items():
            self._handles.append(modules[name].register_forward_hook(self._hook(settings)))
        if not self.hooked:
            # A warning, not an info line: the run would go on in float32 while looking quantized.
            types = "every type" if self.module_types is None else ", ".join(t.__name__ for t in self.module_types)
            rank_zero_warn(
                f"QuantizeActivations selected no module of {type(model).__name__}, so no activation or error is "
                f"quantized (modules: {types}; names: {self.names}; predicate: "
                f"{'given' if self.predicate is not None else 'none'}). Its modules are: "
                f"{', '.join(f'{n} ({type(m).__name__})' for n, m in model.named_modules() if n) or '(none)'}; "
                "widen modules= (None: every type), names= or predicate="
            )
            return
        described = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in self.hooked)
        rank_zero_info(
            f"QuantizeActivations: forward={self.settings.forward}, backward={self.settings.backward}; "
            f"hooked {len(self.hooked)} modules: {described}"
        )

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False

    def _hook(self, settings: ActivationSettings) -> Callable[[nn.Module, Any, Any], Any]:
        def quantize_output(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.enabled or (not module.training and not self.quantize_eval):
                return output
            return _map_float_tensors(output, lambda t: QuantizeFunction.apply(t, *settings, None))

        return quantize_output

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the hooks pass values through unchanged."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.detach()
