"""ScaledFormat: construction, presets, the mx(...) spec grammar, and bad input."""

import pytest

import lightning_lowp as lp
from lightning_lowp.formats import PRESETS, SCALE_ROUNDINGS

SCALED_PRESETS = [name for name, fmt in PRESETS.items() if isinstance(fmt, lp.ScaledFormat)]


def test_the_presets_are_defined_as_their_sources_say():
    e4m3, e2m1 = lp.parse_format("fp8_e4m3"), lp.parse_format("fp4_e2m1")
    for name, element in [("mxfp8_e4m3", "fp8_e4m3"), ("mxfp8_e5m2", "fp8_e5m2"), ("mxfp6_e3m2", "fp6_e3m2"),
                          ("mxfp6_e2m3", "fp6_e2m3"), ("mxfp4", "fp4_e2m1")]:  # fmt: skip
        fmt = PRESETS[name]
        assert (fmt.element, fmt.block, fmt.dim) == (lp.parse_format(element), 32, -1)
        assert (fmt.scale, fmt.scale_rounding, fmt.tensor_scale) == ("e8m0", "floor", False)
    mxint8 = PRESETS["mxint8"]
    assert mxint8.element == lp.FixedPoint(8, 6, symmetric=True)
    assert (mxint8.element.min_value, mxint8.element.max_value) == (-127 / 64, 127 / 64)
    nvfp4 = PRESETS["nvfp4"]
    assert (nvfp4.element, nvfp4.block, nvfp4.scale, nvfp4.tensor_scale) == (e2m1, 16, "fp8_e4m3", True)
    assert PRESETS["fp8_tensorwise"] == lp.ScaledFormat(e4m3, "tensor", scale="fp32")
    assert PRESETS["fp8_rowwise"] == lp.ScaledFormat(e4m3, "row", scale_rounding="rceil")
    assert PRESETS["fp8_blockwise_1x128"] == lp.ScaledFormat(e4m3, 128, scale="fp32")
    assert PRESETS["fp8_blockwise_128x128"] == lp.ScaledFormat(e4m3, (128, 128), scale="fp32")


@pytest.mark.parametrize("name", SCALED_PRESETS)
def test_presets_parse_and_print_by_name(name):
    fmt = lp.parse_format(name)
    assert str(fmt) == name
    assert hash(fmt) == hash(lp.parse_format(name))


@pytest.mark.parametrize(
    ("fmt", "spec"),
    [
        (lp.ScaledFormat("fp8_e4m3", scale_rounding="rceil"), "mx(fp8_e4m3,32,scale_rounding=rceil)"),
        (lp.ScaledFormat("fp8_e5m2", "row", dim=0), "mx(fp8_e5m2,row,dim=0)"),
        (lp.ScaledFormat("float(3,4,subnormals=false)", (4, 8)), "mx(float(3,4,subnormals=false),4x8)"),
        (lp.ScaledFormat("fixed(6,4)", 7, scale="fp32"), "mx(fixed(6,4),7,scale=fp32)"),
        (lp.ScaledFormat("fp6_e3m2", "tensor", scale="fp8_e4m3"), "mx(fp6_e3m2,tensor,scale=fp8_e4m3)"),
        (
            lp.ScaledFormat(lp.FloatingPoint(2, 1, specials="none"), 16, scale="fp8_e4m3"),
            "mx(fp4_e2m1,16,scale=fp8_e4m3)",
        ),
    ],
    ids=str,
)
def test_str_round_trips_through_the_grammar(fmt, spec):
    assert str(fmt) == spec
    assert lp.parse_format(spec) == fmt
    assert lp.parse_format(spec.upper().replace(",", ", ")) == fmt  # case and spaces do not matter


@pytest.mark.parametrize("mode", SCALE_ROUNDINGS)
def test_every_scale_rounding_round_trips(mode):
    fmt = lp.ScaledFormat("fp4_e2m1", 32, scale_rounding=mode)
    assert lp.parse_format(str(fmt)) == fmt


def test_float_scales_round_to_nearest():
    assert lp.ScaledFormat("fp4_e2m1", 16, scale="fp32").scale_rounding == "nearest"
    assert lp.ScaledFormat("fp4_e2m1", 16, scale="fp32", scale_rounding="nearest") == lp.ScaledFormat(
        "fp4_e2m1", 16, scale="fp32"
    )


def test_element_exponents():
    # floor(log2(max element)): 448, 57344, 28, 7.5, 6 and 127/64
    emax = {
        name: PRESETS[name].element_emax
        for name in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8")
    }
    assert emax == {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2, "mxfp4": 2, "mxint8": 0}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"element": "fp8_e4m3", "block": 0}, "block"),
        ({"element": "fp8_e4m3", "block": -3}, "block"),
        ({"element": "fp8_e4m3", "block": (4, 0)}, "block"),
        ({"element": "fp8_e4m3", "block": (4, 4, 4)}, "block"),
        ({"element": "fp8_e4m3", "block": "column"}, "block"),
        ({"element": "fp8_e4m3", "block": 2.5}, "block"),
        ({"element": "bfp(8)"}, "element"),
        ({"element": "fixed(8,6,clamp=false)"}, "element"),
        ({"element": "fp8_e4m3", "scale": "fp16"}, "scale"),
        ({"element": "fp8_e4m3", "scale_rounding": "nearest"}, "scale_rounding"),
        ({"element": "fp8_e4m3", "scale": "fp32", "scale_rounding": "ceil"}, "scale_rounding"),
        ({"element": "fp8_e4m3", "tensor_scale": True}, "tensor_scale"),
        ({"element": "fp8_e4m3", "scale": "fp32", "tensor_scale": True}, "tensor_scale"),
        ({"element": "fp8_e4m3", "tensor_scale": 1}, "tensor_scale"),
        ({"element": "fp8_e4m3", "block": (2, 2), "dim": 0}, "dim"),
        ({"element": "fp8_e4m3", "dim": "0"}, "dim"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        lp.ScaledFormat(**kwargs)


@pytest.mark.parametrize("spec", ["mx()", "mx(fp8_e4m3,32,scale=none)", "mx(nope,32)", "mx(fp8_e4m3,3x)"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match=r"format spec|not accepted|does not parse"):
        lp.parse_format(spec)
