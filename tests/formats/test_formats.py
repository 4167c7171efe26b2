"""Formats: construction, validation, the spec grammar and its round trip."""

import math

import pytest
import torch

import lightning_lowp as lp
from lightning_lowp.formats import PRESETS

EXAMPLES = [
    lp.FixedPoint(8, 7),
    lp.FixedPoint(1, 0),
    lp.FixedPoint(16, -3, clamp=False),
    lp.FixedPoint(4, 2, symmetric=True),
    lp.FloatingPoint(5, 10),
    lp.FloatingPoint(8, 7, subnormals=False),
    lp.FloatingPoint(4, 3, specials="fn", overflow="saturate"),
    lp.FloatingPoint(3, 2, specials="none"),
    lp.FloatingPoint(5, 2, overflow="saturate"),
    lp.FloatingPoint(6, 9),
    lp.FloatingPoint(1, 1, specials="fn"),
    lp.FloatingPoint(3, 3, specials="none"),
    lp.FloatingPoint(8, 0, specials="fn"),
    lp.BlockFloatingPoint(8),
    lp.BlockFloatingPoint(4, dim=0),
    lp.BlockFloatingPoint(8, block_size=32),
    lp.BlockFloatingPoint(6, dim=1, block_size=16),
    *PRESETS.values(),
]


@pytest.mark.parametrize("fmt", EXAMPLES, ids=str)
def test_str_parses_back_to_an_equal_format(fmt):
    parsed = lp.parse_format(str(fmt))
    assert parsed == fmt
    assert hash(parsed) == hash(fmt)


def test_presets_are_the_documented_formats():
    assert lp.parse_format("bf16") == lp.FloatingPoint(8, 7)
    assert lp.parse_format("fp16") == lp.FloatingPoint(5, 10)
    assert lp.parse_format("fp32") == lp.FloatingPoint(8, 23)
    assert lp.parse_format("fp8_e4m3") == lp.FloatingPoint(4, 3, specials="fn", overflow="saturate")
    assert lp.parse_format("fp8_e5m2").overflow == "inf"
    assert lp.parse_format("fp8_e4m3").max_value == 448.0
    assert lp.parse_format("fp8_e5m2").max_value == 57344.0
    assert lp.parse_format("fp4_e2m1").max_value == 6.0
    assert lp.parse_format("fp6_e3m2").max_value == 28.0
    assert lp.parse_format("fp6_e2m3").max_value == 7.5
    assert lp.parse_format("fp16").max_value == 65504.0


def test_spec_grammar_is_lenient_about_case_and_spaces():
    assert lp.parse_format(" Fixed( 8, 7 ) ") == lp.FixedPoint(8, 7)
    assert lp.parse_format("float(4,3,specials=FN,subnormals=False)") == lp.FloatingPoint(
        4, 3, specials="fn", subnormals=False
    )
    assert lp.parse_format("bfp(8,dim=0)") == lp.BlockFloatingPoint(8, dim=0)
    assert lp.parse_format("BF16") == PRESETS["bf16"]


def test_formats_are_immutable_and_hashable():
    fmt = lp.FixedPoint(8, 7)
    with pytest.raises(AttributeError):
        fmt.wl = 4
    assert len({lp.FixedPoint(8, 7), lp.FixedPoint(8, 7), lp.FixedPoint(8, 6)}) == 2
    assert lp.FloatingPoint(8, 7) != lp.FloatingPoint(8, 7, overflow="saturate")


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: lp.FixedPoint(0, 0), "wl"),
        (lambda: lp.FixedPoint(26, 0), "wl"),
        (lambda: lp.FixedPoint(8, 150), "fl"),
        (lambda: lp.FixedPoint(8, 7, clamp="yes"), "clamp"),
        (lambda: lp.FloatingPoint(0, 3), "exp"),
        (lambda: lp.FloatingPoint(9, 3), "exp"),
        (lambda: lp.FloatingPoint(5, 24), "man"),
        (lambda: lp.FloatingPoint(5, -1), "man"),
        (lambda: lp.FloatingPoint(4, 3, specials="ocp"), "specials"),
        (lambda: lp.FloatingPoint(4, 3, overflow="wrap"), "overflow"),
        (lambda: lp.FloatingPoint(4, 3, specials="fn", overflow="inf"), "overflow"),
        (lambda: lp.FloatingPoint(2, 1, specials="none", overflow="inf"), "overflow"),
        (lambda: lp.FloatingPoint(8, 7, specials="none"), "float32's range"),
        (lambda: lp.BlockFloatingPoint(0), "wl"),
        (lambda: lp.BlockFloatingPoint(8, block_size=0), "block_size"),
        (lambda: lp.BlockFloatingPoint(8, dim=1.5), "dim"),
    ],
)
def test_invalid_parameters_name_the_parameter(make, names):
    with pytest.raises(ValueError, match=names):
        make()


@pytest.mark.parametrize(
    "spec", ["fp7", "fixed(8)", "fixed(8,7", "float(4,x)", "bfp(8,color=red)", "fixed(8,dim=1,7)", "", "int8"]
)
def test_malformed_specs_raise_value_error(spec):
    with pytest.raises(ValueError, match=r"spec|wl|fl|exp|man|accepted"):
        lp.parse_format(spec)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="fp8_e4m3"):
        lp.parse_format("fp9")


def test_parse_format_rejects_non_strings():
    with pytest.raises(TypeError):
        lp.parse_format(8)


@pytest.mark.parametrize(
    ("fmt", "lo", "hi"),
    [
        (lp.FixedPoint(8, 7), -1.0, 127 / 128),
        (lp.FixedPoint(8, 7, symmetric=True), -127 / 128, 127 / 128),
        (lp.FixedPoint(4, -2), -32.0, 28.0),
        (lp.FixedPoint(8, 7, clamp=False), -math.inf, math.inf),
        (lp.parse_format("fp8_e4m3"), -448.0, 448.0),
        (lp.parse_format("fp4_e2m1"), -6.0, 6.0),
    ],
    ids=str,
)
def test_element_formats_know_their_range(fmt, lo, hi):
    assert (fmt.min_value, fmt.max_value) == (lo, hi)
    if math.isfinite(hi):  # the kernels saturate at the same ends
        assert lp.quantize(torch.tensor([-1e30, 1e30]), fmt).tolist() == [lo, hi]
