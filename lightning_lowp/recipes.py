"""Recipes: named bundles of formats and rounding modes for every role in training.

A recipe says what each quantity is stored in: weights, gradients, optimizer state
(momentum, Adam's moments), the fp32 master copies of the weights, activations and errors (the gradients
flowing back between layers), and the operands of the matrix multiplies (GEMMs). ``None`` leaves a
role in float32. ``LowPrecision.from_name``, ``QuantizeActivations.from_name`` and
``QuantizeMatmuls.from_name`` take the same names, so one name sets a whole recipe.

    >>> import lightning_lowp as lp
    >>> lp.list_recipes()[:3]
    ['bf16', 'bfp8', 'fixed8']
    >>> lp.get_recipe("bfp8").weight
    BlockFloatingPoint(wl=8, dim=-1, block_size=None)
    >>> lp.register_recipe("fp8_mixed", lp.Recipe(weight="fp8_e4m3", activation="fp8_e4m3",
    ...                                          error="fp8_e5m2", grad="fp8_e5m2"))
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from lightning_lowp.accumulators import Accumulation, AccumulatorLike, as_accumulation
from lightning_lowp.formats import Format, FormatLike, as_format, check_rounding

__all__ = ["Recipe", "ROLES", "register_recipe", "get_recipe", "list_recipes"]

#: The roles a recipe gives a format: the first four belong to ``LowPrecision``, the next two
#: to ``QuantizeActivations``, the last three (GEMM operands) to ``QuantizeMatmuls``.
ROLES = (
    "weight",
    "grad",
    "optimizer_state",
    "master_weight",
    "activation",
    "error",
    "matmul_input",
    "matmul_weight",
    "matmul_grad_output",
)


#: The recipe fields of the three GEMMs' accumulation (``QuantizeMatmuls``'s ``*_accumulate``).
ACCUMULATE_FIELDS = ("matmul_fprop_accumulate", "matmul_dgrad_accumulate", "matmul_wgrad_accumulate")


def check_keep_last(value: object, name: str = "keep_last") -> None:
    """Refuse a ``keep_last`` that is neither a count (int >= 0) nor a fraction in [0, 1)."""
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, float) and 0 <= value < 1
    )
    if not ok:
        raise ValueError(f"{name} must be an int >= 0 (modules) or a float in [0, 1) (a fraction), got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """A format and a rounding mode for every role in training; ``None`` keeps a role in float32.

    Formats may be given as spec strings; they are parsed (and validated) on construction.

    Args:
        weight: the weights the model computes with.
        grad: the weight gradients, before the optimizer step.
        optimizer_state: the optimizer's moment estimates (SGD's momentum, Adam's ``exp_avg``
            and ``exp_avg_sq``, ...).
        master_weight: the master copy of each weight that the optimizer updates (QPyTorch's
            weight accumulator); ``None`` updates the quantized weights directly.
        activation: module outputs in the forward pass.
        error: gradients flowing back into module outputs.
        matmul_input: the activation operand of the GEMMs (x in ``x·Wᵀ``), quantized per GEMM.
        matmul_weight: the weight operand of the GEMMs (W in ``x·Wᵀ``), quantized per GEMM.
        matmul_grad_output: the output gradient operand of the backward GEMMs.
        weight_rounding: the rounding mode of ``weight``; likewise for every role.
        matmul_input_for_wgrad: the format of x in the weight-gradient GEMM (``None``:
            ``matmul_input``'s); likewise ``matmul_weight_for_dgrad`` and
            ``matmul_grad_output_for_wgrad`` (see :class:`~lightning_lowp.MatmulSettings`).
        matmul_weight_for_dgrad: the format of W in the input-gradient GEMM.
        matmul_grad_output_for_wgrad: the format of dy in the weight-gradient GEMM.
        matmul_wgrad_hadamard: the random Hadamard transform of the weight-gradient operands.
        matmul_hadamard_seed: its seed.
        matmul_keep_last: how many of the last selected modules keep bf16 GEMM operands (an
            int), or which fraction of them (a float in [0, 1), rounded up).
        matmul_fprop_accumulate: how the forward GEMM accumulates: an ``lp.Accumulation``
            (accumulator, rounding, promotion ``chunk``) or an accumulator (``"bf16"``,
            ``"aligned(32,14)"``); ``None``: a float32 GEMM. Likewise
            ``matmul_dgrad_accumulate`` and ``matmul_wgrad_accumulate``.
        matmul_dgrad_accumulate: how the input-gradient GEMM accumulates.
        matmul_wgrad_accumulate: how the weight-gradient GEMM accumulates.
    """

    weight: FormatLike | None = None
    grad: FormatLike | None = None
    optimizer_state: FormatLike | None = None
    master_weight: FormatLike | None = None
    activation: FormatLike | None = None
    error: FormatLike | None = None
    matmul_input: FormatLike | None = None
    matmul_weight: FormatLike | None = None
    matmul_grad_output: FormatLike | None = None
    weight_rounding: str = "nearest"
    grad_rounding: str = "nearest"
    optimizer_state_rounding: str = "nearest"
    master_weight_rounding: str = "nearest"
    activation_rounding: str = "nearest"
    error_rounding: str = "nearest"
    matmul_input_rounding: str = "nearest"
    matmul_weight_rounding: str = "nearest"
    matmul_grad_output_rounding: str = "nearest"
    matmul_input_for_wgrad: FormatLike | None = None
    matmul_weight_for_dgrad: FormatLike | None = None
    matmul_grad_output_for_wgrad: FormatLike | None = None
    matmul_wgrad_hadamard: bool = False
    matmul_hadamard_seed: int = 0
    matmul_keep_last: int | float = 0
    matmul_fprop_accumulate: Accumulation | AccumulatorLike | None = None
    matmul_dgrad_accumulate: Accumulation | AccumulatorLike | None = None
    matmul_wgrad_accumulate: Accumulation | AccumulatorLike | None = None

    def __post_init__(self) -> None:
        for role in ROLES:
            value = getattr(self, role)
            if value is not None:
                object.__setattr__(self, role, as_format(value, role))
            check_rounding(getattr(self, f"{role}_rounding"), f"{role}_rounding")
        for key in ("matmul_input_for_wgrad", "matmul_weight_for_dgrad", "matmul_grad_output_for_wgrad"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, as_format(value, key))
        if not isinstance(self.matmul_wgrad_hadamard, bool):
            raise ValueError(f"matmul_wgrad_hadamard must be True or False, got {self.matmul_wgrad_hadamard!r}")
        if isinstance(self.matmul_hadamard_seed, bool) or not isinstance(self.matmul_hadamard_seed, int):
            raise ValueError(f"matmul_hadamard_seed must be an int, got {self.matmul_hadamard_seed!r}")
        check_keep_last(self.matmul_keep_last, "matmul_keep_last")
        for key in ACCUMULATE_FIELDS:
            object.__setattr__(self, key, as_accumulation(getattr(self, key), key))

    def __str__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"Recipe({', '.join(parts)})"


def _seed_recipe(low: Format) -> Recipe:
    """The seed notebook's setting: ``low`` for weights, gradients, activations and errors.

    Optimizer state and master weights are bf16, and every role rounds to nearest. (The seed
    asks for stochastic rounding of gradients and momentum, but OptimLP applies only a
    Quantizer's forward rounding, so its runs round to nearest; these recipes reproduce what
    it ran.)
    """
    return Recipe(weight=low, grad=low, optimizer_state="bf16", master_weight="bf16", activation=low, error=low)


def _float_recipe(fmt: str) -> Recipe:
    """Weights, gradients, activations and errors in ``fmt``.

    Optimizer state and master weights are bf16, or float32 when ``fmt`` is itself 16 bits
    wide (the usual master-weights setting).
    """
    state = None if fmt in ("bf16", "fp16") else "bf16"
    return Recipe(weight=fmt, grad=fmt, optimizer_state=state or fmt, master_weight=state, activation=fmt, error=fmt)


def _matmul_recipe(
    fmt: str, weight: str | None = None, grad_output: str | None = None, grad_output_rounding: str = "nearest"
) -> Recipe:
    """GEMM operands in ``fmt`` (the weight or the output gradient in another format if given)."""
    return Recipe(
        matmul_input=fmt,
        matmul_weight=weight or fmt,
        matmul_grad_output=grad_output or fmt,
        matmul_grad_output_rounding=grad_output_rounding,
    )


_DEEPSEEK_V3_ACCUMULATION = Accumulation("aligned(32,14)", chunk=128)

_RECIPES: dict[str, Recipe] = {
    "fixed8": _seed_recipe(as_format("fixed(8,7)")),
    # 8-bit fixed point that trains: the seed's fixed(8,7) saturates activations at 1 and flushes
    # most gradients to 0. Each role gets the fractional length its values need (measured on
    # LeNet / Fashion-MNIST): activations up to 16, errors and gradients down to 2^-12, the
    # last two rounded stochastically (to nearest, small gradients vanish and the training
    # diverges after a few hundred steps).
    "fixed8_roles": Recipe(
        weight="fixed(8,7)",
        grad="fixed(8,12)",
        optimizer_state="bf16",
        master_weight="bf16",
        activation="fixed(8,3)",
        error="fixed(8,12)",
        grad_rounding="stochastic",
        error_rounding="stochastic",
    ),
    "bfp8": _seed_recipe(as_format("bfp(8)")),
    "bf16": _float_recipe("bf16"),
    "fp16": _float_recipe("fp16"),
    "fp8_e4m3": _float_recipe("fp8_e4m3"),
    "fp8_e5m2": _float_recipe("fp8_e5m2"),
    # ---- GEMM operands only (QuantizeMatmuls); weights, optimizer state and master weights
    # stay in float32, as in the training recipes they come from, which keep high-precision
    # weights and quantize each operand for each GEMM.
    # torchao's MXFP8 training (MXLinear, recipe "mxfp8_rceil"): E4M3 for every operand, blocks
    # of 32 along the GEMM's reduction axis, E8M0 scales chosen by RCEIL.
    "mxfp8": _matmul_recipe("mx(fp8_e4m3,32,scale_rounding=rceil)"),
    # OCP MXFP4: E2M1 in blocks of 32, E8M0 scales chosen by OCP MX v1.0's floor.
    "mxfp4": _matmul_recipe("mxfp4"),
    # NVIDIA's NVFP4 pretraining recipe (arXiv:2509.25149): E2M1 elements, E4M3 scales per 1x16
    # block under a float32 tensor scale; 16x16 2D blocks for weights, so that W and Wᵀ are
    # the same values in the forward and the backward GEMMs; a random Hadamard transform of
    # the weight-gradient operands (16x16, one seeded sign vector); stochastic rounding of
    # gradients; the last layers in BF16 (here the last 15% of the selected modules).
    "nvfp4": replace(
        _matmul_recipe(
            "nvfp4", weight="mx(fp4_e2m1,16x16,scale=fp8_e4m3,tensor_scale=true)", grad_output_rounding="stochastic"
        ),
        matmul_wgrad_hadamard=True,
        matmul_keep_last=0.15,
    ),
    # torchao's float8 training, "tensorwise": a float32 scale per tensor, E4M3 for the forward
    # operands, E5M2 for the output gradient.
    "fp8_tensorwise": _matmul_recipe("fp8_tensorwise", grad_output="mx(fp8_e5m2,tensor,scale=fp32)"),
    # torchao's float8 training, "rowwise": E4M3, one power-of-two scale per row along the
    # reduction axis (the fp8_rowwise preset).
    "fp8_rowwise": _matmul_recipe("fp8_rowwise"),
    # DeepSeek-V3 (arXiv:2412.19437): E4M3 everywhere, float32 scales per 1x128 run of
    # activations and gradients (along each GEMM's reduction axis: 1x128 forward, 128x1 in
    # wgrad) and per 128x128 tile of weights.
    "fp8_blockwise": _matmul_recipe("fp8_blockwise_1x128", weight="fp8_blockwise_128x128"),
    # DeepSeek-V3's FP8 GEMMs (§3.3): the fp8_blockwise operands, and the accumulation of every
    # GEMM (fprop, dgrad, wgrad) as on H800 tensor cores, products aligned and kept to "about 14
    # bits" (here groups of 32, truncated), the partial sums promoted into float32 every 128
    # products (N_C = 128, §3.3.2, "Increasing Accumulation Precision").
    "fp8_deepseek_v3": replace(
        _matmul_recipe("fp8_blockwise_1x128", weight="fp8_blockwise_128x128"),
        matmul_fprop_accumulate=_DEEPSEEK_V3_ACCUMULATION,
        matmul_dgrad_accumulate=_DEEPSEEK_V3_ACCUMULATION,
        matmul_wgrad_accumulate=_DEEPSEEK_V3_ACCUMULATION,
    ),
}


def register_recipe(name: str, recipe: Recipe, overwrite: bool = False) -> None:
    """Make ``recipe`` available by ``name`` to every ``from_name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"recipe name must be a non-empty str, got {name!r}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lightning_lowp.Recipe, got {type(recipe).__name__}")
    if name in _RECIPES and not overwrite:
        raise ValueError(f"a recipe named {name!r} exists already; pass overwrite=True to replace it")
    _RECIPES[name] = recipe


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe registered as ``name`` (a Recipe is returned as is)."""
    if isinstance(name, Recipe):
        return name
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    return _RECIPES[name]


def list_recipes() -> list[str]:
    """The names of the registered recipes, sorted."""
    return sorted(_RECIPES)
