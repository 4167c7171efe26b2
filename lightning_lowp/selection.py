"""What the callbacks that hook selected modules share: the selection and the hooks' lifecycle.

:class:`~lightning_lowp.QuantizeActivations` and :class:`~lightning_lowp.QuantizeMatmuls` pick
modules the same way (types, fnmatch name patterns, a predicate, per-module overrides), attach
their hooks when fit, validate, test or predict starts and remove them when it ends (also after
an exception). Each subclass says what it hooks into a module (:meth:`_hook_module`).

Stochastic rounding in the hooks draws from the callback's own generator, never torch's global
one, so that the bits depend neither on how many random numbers the user's code draws nor on
whether the run was interrupted: the generator is re-seeded before every batch from the
callback's seed, the rank, the stage, the epoch and the batch index (a hash of the five). The
seed comes from torch's seed (``seed_everything``) on rank 0, broadcast to the others when fit,
validate, test or predict starts, and is saved in the checkpoint (``state_dict``): a resumed
run rounds every later batch as the uninterrupted run would, whatever the resumed process
seeded. Under DDP every rank draws its own bits (each rank's activations and errors are its
own); the weights, which the plugin rounds, stay identical across ranks.
"""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_lowp.sharding import clean_name

__all__ = ["ModuleHookCallback", "stream_seed"]

S = TypeVar("S")
_MASK64 = (1 << 64) - 1
_STAGES = {"train": 1, "validate": 2, "test": 3, "predict": 4}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(*values: int) -> int:
    """A 63-bit seed hashed from ``values`` (SplitMix64 over each in turn)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules of ``model`` by name (the root left out), as in the unwrapped model.

    FSDP1 (and activation checkpointing) wrap a layer in a module of its own, whose child is
    named ``_fsdp_wrapped_module``: the layer keeps its unwrapped name (``"net.0"``, not
    ``"net.0._fsdp_wrapped_module"``), and the wrapper, which would have the same name, is
    left out (``named_modules`` lists a parent before its child, so the child wins).
    """
    return {clean_name(n): m for n, m in model.named_modules() if n}


class ModuleHookCallback(pl.Callback, Generic[S]):
    """A callback that hooks the modules it selects, with settings of type ``S`` per module.

    Subclasses set ``settings`` and ``overrides`` (pattern -> settings), call
    :meth:`_init_selection`, and implement :meth:`_hook_module`.
    """

    #: What the warning about an empty selection says is not quantized.
    quantized_what: ClassVar[str] = "value"
    #: Whether each overrides pattern must match a selected module (else: any module).
    overrides_match_selected: ClassVar[bool] = False

    settings: S
    overrides: dict[str, S]

    def _init_selection(
        self,
        modules: Sequence[type[nn.Module]] | None,
        names: Sequence[str] | str | None,
        predicate: Callable[[str, nn.Module], bool] | None,
        quantize_eval: bool,
    ) -> None:
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
        self.quantize_eval = quantize_eval
        self.enabled = True
        self.hooked: dict[str, S] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attached = False  # (also with no module selected, when there are no handles)
        #: What stochastic rounding in the hooks draws from (see the module docstring).
        self.generator = torch.Generator()
        self.seed: int | None = None

    # ---- selection ------------------------------------------------------------------

    def select(self, model: nn.Module) -> dict[str, S]:
        """The modules this callback hooks in ``model``, by name, with their settings."""
        named = list(named_layers(model).items())
        patterns = (self.names or []) + ([] if self.overrides_match_selected else list(self.overrides))
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(
                    f"module pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"its modules are: {', '.join(n for n, _ in named) or '(none)'}"
                )
        selected: dict[str, S] = {}
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
        if self.overrides_match_selected:
            for pattern in self.overrides:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in selected):
                    raise ValueError(
                        f"overrides pattern {pattern!r} matches no selected module of {type(model).__name__}; "
                        f"selected: {', '.join(selected) or '(none)'}"
                    )
        return selected

    # ---- attaching and removing hooks -----------------------------------------------

    def _hook_module(self, name: str, module: nn.Module, settings: S) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook one selected module; returns the handles that remove the hooks."""
        raise NotImplementedError

    def _describe(self) -> str:
        """The settings, for the log line that lists the hooked modules."""
        return str(self.settings)

    def attach(self, model: nn.Module) -> None:
        """Hook the selected modules of ``model`` (nothing happens when already attached)."""
        if self._attached:
            return
        self.hooked = self.select(model)
        self._attached = True
        modules = named_layers(model)
        for name, settings in self.hooked.items():
            self._handles.extend(self._hook_module(name, modules[name], settings))
        kind = type(self).__name__
        if not self.hooked:
            # A warning, not an info line: the run would go on in float32 while looking quantized.
            types = "every type" if self.module_types is None else ", ".join(t.__name__ for t in self.module_types)
            rank_zero_warn(
                f"{kind} selected no module of {type(model).__name__}, so no {self.quantized_what} is quantized "
                f"(modules: {types}; names: {self.names}; predicate: "
                f"{'given' if self.predicate is not None else 'none'}). Its modules are: "
                f"{', '.join(f'{n} ({type(m).__name__})' for n, m in named_layers(model).items()) or '(none)'}; "
                "widen modules= (None: every type), names= or predicate="
            )
            return
        described = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in self.hooked)
        rank_zero_info(f"{kind}: {self._describe()}; hooked {len(self.hooked)} modules: {described}")

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False

    def _active(self, module: nn.Module) -> bool:
        """Whether a hooked module quantizes now: enabled, and training or ``quantize_eval``."""
        return self.enabled and (module.training or self.quantize_eval)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the hooked modules compute as if unhooked."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # ---- the random stream -----------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.seed is None:  # (a checkpoint's seed, restored after setup, replaces it)
            seed = stream_seed(torch.initial_seed(), zlib.crc32(type(self).__name__.encode()))
            self.seed = int(trainer.strategy.broadcast(seed, src=0))

    def _reseed(self, trainer: pl.Trainer, stage: str, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.seed is None:  # used outside a Trainer's setup
            self.seed = stream_seed(torch.initial_seed(), zlib.crc32(type(self).__name__.encode()))
        key = (self.seed, trainer.global_rank, _STAGES[stage], trainer.current_epoch, batch_idx, dataloader_idx)
        self.generator.manual_seed(stream_seed(*key))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._reseed(trainer, "train", batch_idx)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._reseed(trainer, "validate", batch_idx, dataloader_idx)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._reseed(trainer, "test", batch_idx, dataloader_idx)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._reseed(trainer, "predict", batch_idx, dataloader_idx)

    @property
    @override
    def state_key(self) -> str:
        # one per configuration, so that two such callbacks (other modules, other formats) can
        # share a Trainer and each finds its own seed in the checkpoint
        types = None if self.module_types is None else [t.__name__ for t in self.module_types]
        return self._generate_state_key(settings=self._describe(), modules=types, names=self.names)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict.get("seed", self.seed)

    # ---- the stages -------------------------------------------------------------------

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
