"""Python and the compiled kernels share one vocabulary, checked by name; the operators check
their arguments themselves when called directly."""

import dataclasses

import pytest
import torch

import lightning_lowp as lp
import lightning_lowp._C as _C
from lightning_lowp import ops

FORMATS = [
    lp.FixedPoint(8, 7, clamp=False),
    lp.FloatingPoint(4, 3, specials="fn"),
    lp.BlockFloatingPoint(6, dim=0),
    lp.parse_format("mxfp8_e4m3"),
    lp.parse_format("mxint8"),
]


def test_compiled_enums_are_named_as_in_python():
    assert _C.ROUNDING_MODES == lp.ROUNDING_MODES
    assert _C.SPECIALS == lp.formats.SPECIALS
    assert _C.OVERFLOWS == lp.formats.OVERFLOWS
    assert _C.SCALE_ROUNDINGS == lp.formats.SCALE_ROUNDINGS


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_each_format_names_the_parameters_its_kernel_takes(fmt):
    assert fmt.kernel_kind in _C.FORMAT_KINDS
    assert set(fmt.kernel_params()) == set(_C.FORMAT_PARAMS[fmt.kernel_kind])


def test_kernel_args_are_ordered_by_the_compiled_names():
    kind, params = ops.kernel_args(lp.FixedPoint(8, 7, clamp=False, symmetric=True))
    assert _C.FORMAT_KINDS[kind] == "fixed"
    assert dict(zip(_C.FORMAT_PARAMS["fixed"], params, strict=True)) == {"wl": 8, "fl": 7, "clamp": 0, "symmetric": 1}
    kind, params = ops.kernel_args(lp.FloatingPoint(5, 2, overflow="saturate"))
    named = dict(zip(_C.FORMAT_PARAMS["float"], params, strict=True))
    assert _C.FORMAT_KINDS[kind] == "float"
    assert named["specials"] == lp.formats.SPECIALS.index("ieee")
    assert named["overflow"] == lp.formats.OVERFLOWS.index("saturate")


def test_a_stale_extension_is_refused(monkeypatch):
    monkeypatch.setattr(_C, "ROUNDING_MODES", tuple(reversed(_C.ROUNDING_MODES)))
    with pytest.raises(ImportError, match="rebuild"):
        ops.check_vocabulary()


def test_a_format_whose_parameters_do_not_match_its_kernel_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Broken(lp.FixedPoint):
        def kernel_params(self):
            return {"wl": self.wl, "fl": self.fl}

    with pytest.raises(RuntimeError, match="symmetric"):
        ops.kernel_args(Broken(8, 7))


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        (0, [30, 1, 1, 0], "wl=30"),  # 1u << (25 - wl) would be undefined
        (0, [8, 200, 1, 0], "fl=200"),
        (0, [8, 7, 2, 0], "clamp=2"),
        (1, [9, 3, 1, 0, 0], "exp=9"),
        (1, [5, 24, 1, 0, 0], "man=24"),
        (1, [5, 2, 1, 3, 0], "specials=3"),
        (1, [5, 2, 1, 0, 2], "overflow=2"),
        (2, [0, -1, 0], "wl=0"),
        (2, [8, -1, -4], "block_size=-4"),
        (4, [8, 7], "kind must be"),
        (3, [2, 0, 0, 0, 4, 3, 1, 1, -1, 32, 0, 0, 0, 1], "element_kind=2"),
        (3, [1, 0, 0, 0, 4, 3, 1, 1, -1, -2, 0, 0, 0, 1], "block_size=-2"),
        (3, [1, 0, 0, 0, 4, 3, 1, 1, -1, 32, 4, 0, 0, 1], "scale_rounding=4"),
        (3, [0, 30, 6, 1, 0, 0, 0, 0, -1, 32, 0, 0, 0, 1], "wl=30"),
        (3, [1, 0, 0, 0, 4, 3, 1, 1, -1, 32, 0, 3, 0, 1], "scale=3"),
        (3, [1, 0, 0, 0, 4, 3, 1, 1, -1, 32, 0, 0, 0, 0], "tile_rows=0"),
        (3, [1, 0, 0, 0, 4, 3, 1, 1, -1, 0, 0, 0, 0, 4], "tile"),
        (3, [1, 0, 0, 0, 4, 3, 1, 1, -1, 32, 0], "takes 14"),
        (0, [8, 7], "takes"),
    ],
)
def test_operators_check_their_arguments(kind, params, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.lowp.quantize(torch.ones(3), kind, params, 0)


def test_operators_check_the_rounding_mode():
    with pytest.raises(RuntimeError, match="rounding"):
        torch.ops.lowp.quantize(torch.ones(3), 0, [8, 7, 1, 0], 6)


@pytest.mark.parametrize(("spec", "message"), [("fixed(8,,7)", "empty"), ("bfp(8,dim=0,dim=1)", "twice")])
def test_spec_parser_refuses_empty_and_repeated_arguments(spec, message):
    with pytest.raises(ValueError, match=message):
        lp.parse_format(spec)
