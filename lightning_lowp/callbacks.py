"""Lightning callbacks: where and when activations and errors are quantized."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from typing_extensions import override

from lightning_lowp.autograd import QuantizeFunction, resolve_formats
from lightning_lowp.formats import Format, FormatLike
from lightning_lowp.recipes import get_recipe
from lightning_lowp.selection import ModuleHookCallback

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


class QuantizeActivations(ModuleHookCallback[ActivationSettings]):
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

    quantized_what = "activation or error"

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
        self._init_selection(modules, names, predicate, quantize_eval)
        self.overrides = {}
        for pattern, settings in (overrides or {}).items():
            unknown = set(settings) - set(_OVERRIDE_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; accepted: {', '.join(_OVERRIDE_KEYS)}"
                )
            merged = {**self.settings._asdict(), **settings}
            self.overrides[pattern] = ActivationSettings.resolve(**merged)

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

    # ---- hooks ----------------------------------------------------------------------

    @override
    def _describe(self) -> str:
        return f"forward={self.settings.forward}, backward={self.settings.backward}"

    @override
    def _hook_module(
        self, name: str, module: nn.Module, settings: ActivationSettings
    ) -> list[torch.utils.hooks.RemovableHandle]:
        return [module.register_forward_hook(self._hook(settings))]

    def _hook(self, settings: ActivationSettings) -> Callable[[nn.Module, Any, Any], Any]:
        def quantize_output(module: nn.Module, args: Any, output: Any) -> Any:
            if not self._active(module):
                return output
            # the callback's own stream (see lightning_lowp.selection), for the stochastic modes only
            stochastic = "stochastic" in (settings.forward_rounding, settings.backward_rounding)
            generator = self.generator if stochastic else None
            return _map_float_tensors(output, lambda t: QuantizeFunction.apply(t, *settings, generator))

        return quantize_output
