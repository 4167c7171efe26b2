"""One recipe name, every part of a Trainer it needs: ``plugins, callbacks = lp.from_recipe(name)``.

A recipe may set roles of three kinds: weights, gradients, optimizer state and master weights
(the :class:`~lightning_lowp.LowPrecision` plugin), activations and errors
(:class:`~lightning_lowp.QuantizeActivations`), GEMM operands
(:class:`~lightning_lowp.QuantizeMatmuls`). ``from_recipe`` builds the parts whose roles the
recipe sets, and only those, so that no part runs that would quantize nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from lightning_lowp.callbacks import QuantizeActivations
from lightning_lowp.matmuls import OPERAND_ROLES, QuantizeMatmuls
from lightning_lowp.plugins import LowPrecision
from lightning_lowp.recipes import ACCUMULATE_FIELDS, get_recipe

__all__ = ["from_recipe"]

_PLUGIN_ROLES = ("weight", "grad", "optimizer_state", "master_weight")
_ACTIVATION_ROLES = ("activation", "error")


def from_recipe(
    name: str,
    activations: Mapping[str, Any] | None = None,
    matmuls: Mapping[str, Any] | None = None,
) -> tuple[list[LowPrecision], list[pl.Callback]]:
    """The plugin and callbacks that carry out recipe ``name``, for ``pl.Trainer(plugins=, callbacks=)``.

    Args:
        name: a registered recipe (``lp.list_recipes()``).
        activations: arguments for ``QuantizeActivations.from_name`` (the selection, settings
            to replace), used when the recipe sets ``activation`` or ``error``.
        matmuls: arguments for ``QuantizeMatmuls.from_name`` (e.g. ``modules=(nn.Linear,
            nn.Conv2d)``, ``overrides=``), used when the recipe sets a ``matmul_*`` operand.

    Returns:
        ``(plugins, callbacks)``: ``[LowPrecision]`` when the recipe sets a weight, gradient,
        optimizer-state or master-weight role, else ``[]``; then ``QuantizeActivations`` and
        ``QuantizeMatmuls``, each when the recipe sets one of its roles.

    Raises:
        ValueError: for an unknown recipe, or arguments for a part the recipe does not use.

    Example:
        >>> plugins, callbacks = lp.from_recipe("nvfp4", matmuls={"modules": (nn.Linear, nn.Conv2d)})
        >>> trainer = pl.Trainer(plugins=plugins, callbacks=[*callbacks, lp.QuantizationMetrics()])
    """
    r = get_recipe(name)
    uses_activations = any(getattr(r, role) is not None for role in _ACTIVATION_ROLES)
    uses_matmuls = any(getattr(r, f"matmul_{role}") is not None for role in OPERAND_ROLES) or any(
        getattr(r, key) is not None for key in ACCUMULATE_FIELDS
    )
    for given, used, roles in (
        (activations, uses_activations, "activation or error"),
        (matmuls, uses_matmuls, "matmul_input, matmul_weight, matmul_grad_output or matmul_*_accumulate"),
    ):
        if given and not used:
            raise ValueError(f"recipe {name!r} sets no {roles} role, so the arguments {dict(given)} would do nothing")
    plugins = [LowPrecision.from_name(name)] if any(getattr(r, role) is not None for role in _PLUGIN_ROLES) else []
    callbacks: list[pl.Callback] = []
    if uses_activations:
        callbacks.append(QuantizeActivations.from_name(name, **(activations or {})))
    if uses_matmuls:
        callbacks.append(QuantizeMatmuls.from_name(name, **(matmuls or {})))
    return plugins, callbacks
