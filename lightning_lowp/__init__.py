"""lightning_lowp: simulate low-precision training in PyTorch Lightning.

Number formats (fixed point, custom floats, block floating point, FP8), exact rounding
kernels in C++/CUDA, their functional and autograd API, recipes, and Lightning callbacks.
See README.md and docs/.
"""

from lightning_lowp.accumulation import matmul
from lightning_lowp.accumulators import Accumulation, AlignedSum
from lightning_lowp.autograd import Quantizer, quantizer
from lightning_lowp.bundle import from_recipe
from lightning_lowp.callbacks import QuantizeActivations
from lightning_lowp.data import LeNet, MNISTFamily
from lightning_lowp.formats import (
    PRESETS,
    ROUNDING_MODES,
    BlockFloatingPoint,
    FixedPoint,
    FloatingPoint,
    Format,
    FormatLike,
    ScaledFormat,
    parse_format,
)
from lightning_lowp.functional import quantize, quantize_, quantize_foreach_
from lightning_lowp.matmuls import (
    MatmulSettings,
    QuantizeMatmuls,
    quantized_conv,
    quantized_linear,
    quantized_matmul,
    random_hadamard,
)
from lightning_lowp.metrics import QuantizationMetrics
from lightning_lowp.plugins import FSDPLowPrecision, LowPrecision, NonFiniteError
from lightning_lowp.recipes import Recipe, get_recipe, list_recipes, register_recipe
from lightning_lowp.vit import ViT

__version__ = "0.1.0"

__all__ = [
    "Format",
    "FormatLike",
    "FixedPoint",
    "FloatingPoint",
    "BlockFloatingPoint",
    "ScaledFormat",
    "PRESETS",
    "ROUNDING_MODES",
    "parse_format",
    "quantize",
    "quantize_",
    "quantize_foreach_",
    "matmul",
    "Accumulation",
    "AlignedSum",
    "quantizer",
    "Quantizer",
    "Recipe",
    "register_recipe",
    "get_recipe",
    "list_recipes",
    "from_recipe",
    "QuantizeActivations",
    "MatmulSettings",
    "QuantizeMatmuls",
    "quantized_linear",
    "quantized_matmul",
    "quantized_conv",
    "random_hadamard",
    "FSDPLowPrecision",
    "LowPrecision",
    "NonFiniteError",
    "QuantizationMetrics",
    "LeNet",
    "MNISTFamily",
    "ViT",
]
