"""Compatibility layers: other libraries' APIs on lightning_lowp's kernels.

``lightning_lowp.compat.qtorch`` - QPyTorch's names and signatures (``FixedPoint``,
``FloatingPoint``, ``BlockFloatingPoint``, ``Quantizer``, ``quantizer``, ``OptimLP``,
``fixed_point_quantize``, ``float_quantize``, ``block_quantize``) in one module.
"""

__all__ = ["qtorch"]
