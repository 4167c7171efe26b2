"""Lightning callbacks: where and when activations and errors are quantized."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_lowp.autograd import _formats, _Quantize
from lightning_lowp.recipes import FormatLike, get_recipe

__all__ = ["QuantizeActivations", "DEFAULT_MODULES"]

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

_OVERRIDE_KEYS = ("forward", "backward", "forward_rounding", "backward_rounding")


class QuantizeActivations(pl.Callback):
    """Quantizes the output of selected modules (activations) in the forward pass, and the
    gradient flowing back into that output (errors) in the backward pass.

    Args:
        forward, backward: formats (objects or spec strings) of activations and errors;
            ``None`` leaves that direction in float32.
        forward_rounding, backward_rounding: rounding modes.
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
            (the same as ``from_name``; handy in YAML configs).

    Hooks are attached when fit, validate, test or predict starts and removed when it ends
    (also after an error). The selection is checked then, before any step runs.
    """

    def __init__(
        self,
        forward: FormatLike = None,
        backward: FormatLike = None,
        forward_rounding: str = "nearest",
        backward_rounding: str = "nearest",
        modules: Sequence[type[nn.Module]] | None = DEFAULT_MODULES,
        names: Sequence[str] | None = None,
        predicate: Callable[[str, nn.Module], bool] | None = None,
        overrides: Mapping[str, Mapping[str, object]] | None = None,
        quantize_eval: bool = True,
        recipe: str | None = None,
    ):
        super().__init__()
        if recipe is not None:
            if (forward, backward, forward_rounding, backward_rounding) != (None, None, "nearest", "nearest"):
                raise ValueError(f"give either recipe={recipe!r} or forward/backward formats, not both")
            r = get_recipe(recipe)
            forward, backward = r.activation, r.error
            forward_rounding, backward_rounding = r.activation_rounding, r.error_rounding
        self.settings = self._settings(forward, backward, forward_rounding, backward_rounding)
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
        self.overrides = {}
        for pattern, settings in (overrides or {}).items():
            unknown = set(settings) - set(_OVERRIDE_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; accepted: {', '.join(_OVERRIDE_KEYS)}"
                )
            merged = {**dict(zip(_OVERRIDE_KEYS, self.settings, strict=False)), **settings}
            self.overrides[pattern] = self._settings(*(merged[k] for k in _OVERRIDE_KEYS))
        self.quantize_eval = quantize_eval
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.hooked: dict[str, tuple] = {}

    @classmethod
    def from_name(cls, name: str, **kwargs) -> QuantizeActivations:
        """The activation and error settings of a registered recipe (see ``lp.list_recipes()``)."""
        return cls(recipe=name, **kwargs)

    @staticmethod
    def _settings(forward, backward, forward_rounding, backward_rounding) -> tuple:
        forward, backward = _formats(forward, backward, forward_rounding, backward_rounding)
        return forward, backward, forward_rounding, backward_rounding

    # ---- selection ------------------------------------------------------------------

    def select(self, model: nn.Module) -> dict[str, tuple]:
        """The modules this callback hooks in ``model``, by name, with their settings."""
        named = [(n, m) for n, m in model.named_modules() if n]  # the root is not a layer
        for pattern in (self.names or []) + list(self.overrides):
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(
                    f"module pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"its modules are: {', '.join(n for n, _ in named) or '(none)'}"
                )
        selected = {}
        for name, module in named:
            if self.module_types is not None and not isinstance(module, self.module_types):
                continue
            if self.names is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.names):
                continue
            if self.predicate is not None and not self.predicate(name, module):
                continue
            settings = self.settings
            for pattern, override in self.overrides.items():
                if fnmatch.fnmatchcase(name, pattern):
                    settings = override
            selected[name] = settings
        return selected

    # ---- attaching and removing hooks -----------------------------------------------

    def attach(self, model: nn.Module) -> None:
        if self._handles:
            return
        self.hooked = self.select(model)
        modules = dict(model.named_modules())
        for name, settings in self.hooked.items():
            self._handles.append(modules[name].register_forward_hook(self._hook(settings)))
        described = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in self.hooked) or "none"
        fwd, bwd = self.settings[0], self.settings[1]
        rank_zero_info(
            f"QuantizeActivations: forward={fwd}, backward={bwd}; hooked {len(self.hooked)} modules: {described}"
        )

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, settings):
        forward, backward, forward_rounding, backward_rounding = settings

        def quantize_output(module, args, output):
            if not self.enabled or (not module.training and not self.quantize_eval):
                return output
            if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
                return output
            return _Quantize.apply(output, forward, backward, forward_rounding, backward_rounding, None)

        return quantize_output

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the hooks pass values through unchanged."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def on_fit_start(self, trainer, pl_module):
        self.attach(pl_module)

    def on_validation_start(self, trainer, pl_module):
        self.attach(pl_module)

    def on_test_start(self, trainer, pl_module):
        self.attach(pl_module)

    def on_predict_start(self, trainer, pl_module):
        self.attach(pl_module)

    def teardown(self, trainer, pl_module, stage):
        self.detach()

    def on_exception(self, trainer, pl_module, exception):
        self.detach()
