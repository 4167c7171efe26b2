"""lightning_lowp.compat.qtorch: QPyTorch's API on lightning_lowp's kernels.

The formats map to lightning_lowp formats, the functions equal lightning_lowp.quantize and the
float64 reference in the mapped rounding mode, QPyTorch's conventions hold (floats: no exponent
code reserved, IEEE subnormals, saturation, ties away from zero; fixed point and block floating point: QPyTorch's
floor(x + 1/2) rule wherever it is not a negative exact tie), and Quantizer / quantizer /
OptimLP do what QPyTorch's do, checked against hand computations.
"""

import math

import numpy as np
import pytest
import torch
from helpers import assert_bits_equal, bits, f32

import lightning_lowp as lp
from lightning_lowp.compat import qtorch as qt
from lightning_lowp.compat.qtorch import (
    BlockFloatingPoint,
    FixedPoint,
    FloatingPoint,
    OptimLP,
    Quantizer,
    block_quantize,
    fixed_point_quantize,
    float_quantize,
    quantizer,
)
from lightning_lowp.reference import reference_quantize

# ---- format mapping -----------------------------------------------------------------------


def test_formats_map_to_lightning_lowp_formats():
    assert FixedPoint(8, 7).to_lowp() == lp.FixedPoint(8, 7)
    assert FixedPoint(6, 2, clamp=False, symmetric=True).to_lowp() == lp.FixedPoint(6, 2, clamp=False, symmetric=True)
    assert BlockFloatingPoint(8).to_lowp() == lp.BlockFloatingPoint(8, dim=-1)
    assert BlockFloatingPoint(5, dim=1).to_lowp() == lp.BlockFloatingPoint(5, dim=1)
    for exp in range(1, 9):
        for man in (0, 1, 2, 3, 7, 10, 23):
            fmt = FloatingPoint(exp, man).to_lowp()
            bias = 2 ** (exp - 1) - 1
            # QPyTorch: no exponent code reserved (max_exponent_store = 2^(exp-1) + 127), mantissa
            # all ones at the top; smallest normal exponent 1 - bias (its min_exp), subnormals below.
            if exp < 8:
                assert fmt == lp.FloatingPoint(exp, man, subnormals=True, specials="none", overflow="saturate")
                assert fmt.max_value == (2 - 2.0**-man) * 2.0 ** (bias + 1)
            else:  # that top binade is past float32: float32's own overflow to Inf, as in QPyTorch
                assert fmt == lp.FloatingPoint(8, man, subnormals=True, specials="ieee", overflow="inf")
                assert fmt.max_value == (2 - 2.0**-man) * 2.0**127
            assert fmt.emin == 1 - bias
    for number in (FixedPoint(8, 7), FloatingPoint(5, 2), BlockFloatingPoint(8)):
        assert number.rounding("nearest") == "nearest_away"
        assert number.rounding("stochastic") == "stochastic"


def test_numbers_are_qpytorch_like_values():
    assert repr(FixedPoint(8, 7)) == "FixedPoint (wl=8, fl=7)"
    assert str(FloatingPoint(8, 7)) == "FloatingPoint (exponent=8, mantissa=7)"
    assert repr(BlockFloatingPoint(8)) == "BlockFloatingPoint (wl=8, dim=-1)"
    assert FixedPoint(8, 7) == FixedPoint(8, 7) != FixedPoint(8, 7, symmetric=True)
    assert len({FloatingPoint(5, 2), FloatingPoint(5, 2), BlockFloatingPoint(8)}) == 2
    assert isinstance(FixedPoint(8, 7), qt.Number)


# ---- functions against lightning_lowp and the reference -------------------------------------


def _fixed_inputs(fl):
    step = 2.0**-fl
    ks = np.arange(-20, 20)
    ties = (ks + 0.5) * step
    near = np.concatenate(
        [
            np.nextafter(ties.astype(np.float32), np.float32(np.inf)),
            np.nextafter(ties.astype(np.float32), np.float32(-np.inf)),
        ]
    )
    rng = np.random.default_rng(0)
    return f32(
        np.concatenate(
            [ties, near, ks * step, rng.normal(0, 4 * step, 200), [1e6, -1e6, 0.0, -0.0, np.inf, -np.inf, np.nan]]
        )
    )


def _float_inputs(exp, man):
    fmt = FloatingPoint(exp, man).to_lowp()
    rng = np.random.default_rng(1)
    emin = fmt.emin
    sub = np.arange(0, 2**man + 1) * 2.0 ** (emin - man)  # subnormal grid and 2^emin
    values = [
        sub,
        sub + 2.0 ** (emin - man - 1),
        1 + (np.arange(2**man) + 0.5) * 2.0**-man,
        rng.normal(0, 1, 200) * 2.0 ** rng.integers(-20, 20, 200),
        [fmt.max_value, fmt.max_value * (1 + 2.0**-man), fmt.max_value * 1.01, 3e38, np.inf, np.nan, 0.0],
    ]
    v = np.concatenate(values)
    v = v[np.abs(v) < 3.4e38 + 1e38 * np.isinf(v)]  # float32-representable (Inf kept)
    return f32(np.concatenate([v, -v]))


def _block_inputs():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (6, 32)) * 2.0 ** rng.integers(-4, 4, (6, 1))
    x[:, 0] = [1.0, 3.0, 0.75, 5.0, 1.5, 0.1]  # block maxima
    x[:, 1:9] = (np.arange(-4, 4) + 0.5)[None, :] * 2.0**-5  # ties on a fine grid
    x[2, :] = 0.0  # an all-zero row
    return f32(x)


CASES = [
    ("fixed", lambda r: fixed_point_quantize(_fixed_inputs(3), 6, 3, rounding=r), _fixed_inputs(3), FixedPoint(6, 3)),
    (
        "fixed_sym_noclamp",
        lambda r: fixed_point_quantize(_fixed_inputs(2), 4, 2, False, True, rounding=r),
        _fixed_inputs(2),
        FixedPoint(4, 2, clamp=False, symmetric=True),
    ),
    (
        "float_e5m2",
        lambda r: float_quantize(_float_inputs(5, 2), 5, 2, rounding=r),
        _float_inputs(5, 2),
        FloatingPoint(5, 2),
    ),
    (
        "float_e4m3",
        lambda r: float_quantize(_float_inputs(4, 3), 4, 3, rounding=r),
        _float_inputs(4, 3),
        FloatingPoint(4, 3),
    ),
    ("bf16", lambda r: float_quantize(_float_inputs(8, 7), 8, 7, rounding=r), _float_inputs(8, 7), FloatingPoint(8, 7)),
    (
        "float_e1m2",
        lambda r: float_quantize(_float_inputs(1, 2), 1, 2, rounding=r),
        _float_inputs(1, 2),
        FloatingPoint(1, 2),
    ),
    (
        "float_e2m3",
        lambda r: float_quantize(_float_inputs(2, 3), 2, 3, rounding=r),
        _float_inputs(2, 3),
        FloatingPoint(2, 3),
    ),
    (
        "float_e7m5",
        lambda r: float_quantize(_float_inputs(7, 5), 7, 5, rounding=r),
        _float_inputs(7, 5),
        FloatingPoint(7, 5),
    ),
    ("bfp_tensor", lambda r: block_quantize(_block_inputs(), 6, rounding=r), _block_inputs(), BlockFloatingPoint(6)),
    (
        "bfp_dim0",
        lambda r: block_quantize(_block_inputs(), 4, dim=0, rounding=r),
        _block_inputs(),
        BlockFloatingPoint(4, dim=0),
    ),
    (
        "bfp_dim1",
        lambda r: block_quantize(_block_inputs(), 8, dim=1, rounding=r),
        _block_inputs(),
        BlockFloatingPoint(8, dim=1),
    ),
]


@pytest.mark.parametrize(("name", "fn", "x", "number"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_functions_equal_lightning_lowp_and_the_reference(name, fn, x, number, rounding):
    mode = {"nearest": "nearest_away", "stochastic": "stochastic"}[rounding]
    torch.manual_seed(7)
    got = fn(rounding)
    torch.manual_seed(7)
    expected = lp.quantize(x, number.to_lowp(), mode)
    torch.manual_seed(7)
    reference = reference_quantize(x, number.to_lowp(), mode)
    assert_bits_equal(got, expected)
    assert_bits_equal(got, reference)


def test_stochastic_is_the_default_and_reproducible():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = fixed_point_quantize(x, 8, 4)
    torch.manual_seed(3)
    b = lp.quantize(x, lp.FixedPoint(8, 4), "stochastic")
    assert_bits_equal(a, b)
    assert not torch.equal(a, lp.quantize(x, lp.FixedPoint(8, 4), "nearest_away"))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # other dtypes come back as they went in
        assert float_quantize(x.to(dtype), 5, 2, "nearest").dtype == dtype


# ---- QPyTorch's conventions ----------------------------------------------------------------


def test_float_rounds_ties_away_from_zero_with_ieee_subnormals():
    x = f32([1.125, -1.125, 1.375, 2.0**-16 * 1.5, 2.0**-17, -(2.0**-17), 2.0**-18, 2.0**-16])
    # e5m2: steps 2^-2 on [1, 2); subnormal step 2^-16 (emin = -14)
    expected = f32([1.25, -1.25, 1.5, 2.0**-15, 2.0**-16, -(2.0**-16), 0.0, 2.0**-16])
    assert_bits_equal(float_quantize(x, 5, 2, "nearest"), expected)
    # ties to even would give 1.0 for 1.125: that is not QPyTorch's rule
    assert lp.quantize(f32([1.125]), "fp8_e5m2", "nearest").item() == 1.0


def test_float_saturates_below_exp_8():
    big = (2 - 2.0**-2) * 2.0**16  # e5m2's largest value in QPyTorch, 114688
    x = f32([1.1e5, 1.2e5, 1e30, np.inf, -np.inf, -1.2e5, np.nan])
    out = float_quantize(x, 5, 2, "nearest")
    assert out[:6].tolist() == [big, big, big, big, -big, -big]
    assert torch.isnan(out[6])  # NaN stays NaN (QPyTorch would give +-max)
    torch.manual_seed(0)
    assert float_quantize(f32([1e30, -np.inf] * 50), 5, 2).abs().max().item() == big
    # bfloat16 = FloatingPoint(8, 7): past its largest value float32 overflows, in QPyTorch too
    fmax = f32([np.finfo(np.float32).max, -np.inf, (2 - 2.0**-7) * 2.0**127])
    bf16_max = (2 - 2.0**-7) * 2.0**127
    assert float_quantize(fmax, 8, 7, "nearest").tolist() == [np.inf, -np.inf, bf16_max]
    assert_bits_equal(float_quantize(fmax, 8, 7, "nearest"), lp.quantize(fmax, "bf16", "nearest_away"))


def test_bfloat16_equals_torch_cast_except_ties():
    x = torch.randn(100_000) * 2.0 ** torch.randint(-60, 60, (100_000,)).float()
    ties = (bits(x) & 0xFFFF) == 0x8000
    q = float_quantize(x, 8, 7, "nearest")
    assert torch.equal(q[~ties], x[~ties].to(torch.bfloat16).float())
    tie = f32([1 + 2.0**-8])  # halfway between 1 and 1 + 2^-7
    assert float_quantize(tie, 8, 7, "nearest").item() == 1 + 2.0**-7
    assert tie.to(torch.bfloat16).item() == 1.0


def _qpytorch_fixed(x: torch.Tensor, wl, fl, symmetric=False):
    """QPyTorch's CPU rule floor(x * 2^fl + 1/2) * 2^-fl, clamped, evaluated exactly (float64)."""
    t = torch.floor(x.double() * 2.0**fl + 0.5) * 2.0**-fl
    lo = -(2.0 ** (wl - 1) - symmetric) * 2.0**-fl
    return t.clamp(lo, (2.0 ** (wl - 1) - 1) * 2.0**-fl).float()


def test_fixed_point_matches_qpytorch_except_negative_ties():
    x = _fixed_inputs(3)
    x = x[torch.isfinite(x)]
    out = fixed_point_quantize(x, 6, 3, rounding="nearest")
    qpt = _qpytorch_fixed(x, 6, 3)
    negative_tie = (x < 0) & (torch.frac(x.double() * 8).abs() == 0.5) & (qpt > -4)
    assert negative_tie.sum() > 10
    assert torch.equal(out[~negative_tie], qpt[~negative_tie])
    # a negative exact tie: QPyTorch rounds toward zero (toward +inf), we round away from zero
    assert torch.equal(out[negative_tie], qpt[negative_tie] - 0.125)
    assert fixed_point_quantize(f32([-0.0625, 0.0625]), 6, 3, rounding="nearest").tolist() == [-0.125, 0.125]


def test_fixed_point_range_and_inf():
    x = f32([100.0, -100.0, np.inf, -np.inf, 3.76, -4.2, np.nan])
    out = fixed_point_quantize(x, 4, 1, rounding="nearest")  # range [-4, 3.5], step 0.5
    assert out[:6].tolist() == [3.5, -4.0, 3.5, -4.0, 3.5, -4.0]
    assert torch.isnan(out[6])
    assert fixed_point_quantize(x, 4, 1, symmetric=True, rounding="nearest")[:4].tolist() == [3.5, -3.5, 3.5, -3.5]
    assert fixed_point_quantize(x, 4, 1, clamp=False, rounding="nearest")[:4].tolist() == [100, -100, np.inf, -np.inf]


def test_correctly_rounded_where_qpytorch_double_rounds():
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    # QPyTorch's float32 floor(a + 0.5): 0.49999997 + 0.5 rounds to 1.0, so it returns 1
    assert torch.floor(f32([below_half]) + 0.5).item() == 1.0
    assert fixed_point_quantize(f32([below_half]), 8, 0, rounding="nearest").item() == 0.0
    # block floating point: QPyTorch adds 6 * 2^E (E = 0 here) in float32 first, which turns
    # x = 2^-7 - 2^-22 (just below the tie between 0 and 2^-6 at wl=8) into the tie itself
    x = f32([1.0, 2.0**-7 - 2.0**-22])
    assert ((x[1:] + 6.0) - 6.0).item() == 2.0**-7
    assert block_quantize(x, 8, rounding="nearest").tolist() == [1.0, 0.0]


def _qpytorch_block(x: torch.Tensor, wl):
    """QPyTorch's whole-tensor rule, exactly: E = floor(log2 max|x|), x to the nearest multiple of
    2^(E-wl+2) with ties toward +inf, clipped to +-(2^(E+1) - 2^(E-wl+2))."""
    e = math.floor(math.log2(x.abs().max().item()))
    step = 2.0 ** (e - wl + 2)
    limit = 2.0 ** (e + 1) - step
    return (torch.floor(x.double() / step + 0.5) * step).clamp(-limit, limit).float(), step


def test_block_floating_point_matches_qpytorch_except_negative_ties():
    x = _block_inputs().flatten()
    for wl in (3, 6, 8):
        out = block_quantize(x, wl, rounding="nearest")
        qpt, step = _qpytorch_block(x, wl)
        negative_tie = (x < 0) & (torch.frac(x.double() / step).abs() == 0.5)
        assert torch.equal(out[~negative_tie], qpt[~negative_tie])
        assert torch.equal(out[negative_tie], qpt[negative_tie] - step)


# ---- Quantizer and quantizer ------------------------------------------------------------------


def test_quantizer_forward_and_backward():
    x = torch.randn(64, requires_grad=True)
    g = torch.randn(64)
    q = Quantizer(FixedPoint(8, 4), FloatingPoint(5, 2), forward_rounding="nearest", backward_rounding="nearest")
    y = q(x)
    assert_bits_equal(y, fixed_point_quantize(x.detach(), 8, 4, rounding="nearest"))
    (y * g).sum().backward()
    assert_bits_equal(x.grad, float_quantize(g, 5, 2, rounding="nearest"))
    assert isinstance(q, torch.nn.Module)
    assert list(q.state_dict()) == []
    assert "FixedPoint (wl=8, fl=4)" in repr(q)


def test_quantizer_identity_and_stochastic_defaults():
    x = torch.randn(64, requires_grad=True)
    g = torch.randn(64)
    y = Quantizer()(x)
    assert torch.equal(y, x.detach())
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)
    # defaults: stochastic both ways, seeded by torch
    x.grad = None
    q = quantizer(BlockFloatingPoint(6), FixedPoint(8, 6))
    torch.manual_seed(11)
    y = q(x)
    (y * g).sum().backward()
    torch.manual_seed(11)
    assert_bits_equal(y, lp.quantize(x.detach(), lp.BlockFloatingPoint(6), "stochastic"))
    assert_bits_equal(x.grad, lp.quantize(g, lp.FixedPoint(8, 6), "stochastic"))
    # only the gradient quantized
    x.grad = None
    Quantizer(None, FixedPoint(8, 2), backward_rounding="nearest")(x).backward(g)
    assert_bits_equal(x.grad, fixed_point_quantize(g, 8, 2, rounding="nearest"))


def test_quantizer_clamping_grad_zero_and_backward_hooks():
    x = f32([-5.0, -4.2, 0.3, 3.5, 3.74, 3.76, 10.0]).requires_grad_()
    g = f32([1.0, 1.5, 0.3, -0.7, 2.0, 1.0, 1.0])
    q = quantizer(
        FixedPoint(4, 1),
        FixedPoint(8, 2),
        "nearest",
        "nearest",
        clamping_grad_zero=True,
        backward_hooks=[lambda grad: grad * 2],
    )
    y = q(x)
    assert y.tolist() == [-4.0, -4.0, 0.5, 3.5, 3.5, 3.5, 3.5]
    y.backward(g)
    # rounded outside [-4, 3.5] (QPyTorch's mask): -5, 3.76 (-> 4.0) and 10; the rest get
    # 2 * g rounded to multiples of 1/4
    assert x.grad.tolist() == [0.0, 3.0, 0.5, -1.5, 4.0, 0.0, 0.0]
    # without a forward format nothing is masked
    x.grad = None
    quantizer(None, None, clamping_grad_zero=True)(x).backward(g)
    assert torch.equal(x.grad, g)
    # stochastic forward with the mask draws like the plain format
    torch.manual_seed(5)
    ys = quantizer(FixedPoint(4, 1), clamping_grad_zero=True)(x)
    torch.manual_seed(5)
    assert_bits_equal(ys, lp.quantize(x.detach(), lp.FixedPoint(4, 1), "stochastic"))
    # other dtypes
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    yb = quantizer(FixedPoint(4, 1), clamping_grad_zero=True, forward_rounding="nearest")(xb)
    assert yb.dtype == torch.bfloat16
    assert yb.tolist() == y.tolist()


# ---- OptimLP --------------------------------------------------------------------------------


def _nearest(number):
    return Quantizer(number, None, forward_rounding="nearest", backward_rounding="stochastic")


def test_optimlp_sgd_momentum_steps_by_hand():
    w0 = f32([0.3, -1.7, 0.05, 2.2, -0.4, 0.9])
    g1 = f32([0.11, -0.37, 0.9, -0.02, 0.5, -1.3])
    g2 = f32([-0.2, 0.15, 0.33, 0.7, -0.9, 0.01])
    lr, mom, wd, scale = 0.1, 0.9, 1e-2, 2.0
    p = torch.nn.Parameter(w0.clone())
    fixed84, fixed86 = FixedPoint(8, 4), FixedPoint(8, 6)
    opt = OptimLP(
        torch.optim.SGD([p], lr=lr, momentum=mom, weight_decay=wd),
        weight_quant=_nearest(fixed84),
        grad_scaling=scale,
        grad_quant=_nearest(fixed86),
        momentum_quant=_nearest(FloatingPoint(5, 2)),
        acc_quant=_nearest(FloatingPoint(8, 7)),
    )

    def wq(t):
        return fixed_point_quantize(t, 8, 4, rounding="nearest")

    def aq(t):
        return float_quantize(t, 8, 7, rounding="nearest")

    def mq(t):
        return float_quantize(t, 5, 2, rounding="nearest")

    # step 1: the accumulator starts as the initial weight
    p.grad = g1.clone()
    opt.step()
    gq1 = fixed_point_quantize(g1 * scale, 8, 6, rounding="nearest")
    d1 = gq1.add(w0, alpha=wd)  # SGD: weight decay on the accumulator, not the quantized weight
    buf1 = d1.clone()
    acc1 = aq(w0.add(buf1, alpha=-lr))
    assert_bits_equal(p.grad, gq1)
    assert_bits_equal(opt.weight_acc[p], acc1)
    assert_bits_equal(p.detach(), wq(acc1))
    assert_bits_equal(opt.optim.state[p]["momentum_buffer"], mq(buf1))
    assert not torch.equal(p.detach(), acc1)  # the weight and its accumulator differ

    # step 2: steps the accumulator with the quantized momentum
    opt.zero_grad()
    assert p.grad is None
    p.grad = g2.clone()
    opt.step()
    gq2 = fixed_point_quantize(g2 * scale, 8, 6, rounding="nearest")
    d2 = gq2.add(acc1, alpha=wd)
    buf2 = mq(buf1).mul(mom).add(d2)
    acc2 = aq(acc1.add(buf2, alpha=-lr))
    assert_bits_equal(opt.weight_acc[p], acc2)
    assert_bits_equal(p.detach(), wq(acc2))
    assert_bits_equal(opt.state[p]["momentum_buffer"], mq(buf2))


def test_optimlp_adam_step_by_hand():
    w0 = f32([0.3, -1.7, 0.05, 2.2])
    g = f32([0.3, -0.7, 1.9, -0.05])
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    p = torch.nn.Parameter(w0.clone())
    opt = OptimLP(
        torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=eps),
        weight_quant=_nearest(FixedPoint(8, 6)),
        momentum_quant=_nearest(FloatingPoint(5, 2)),
        acc_quant=_nearest(FloatingPoint(8, 7)),
    )
    p.grad = g.clone()
    opt.step()
    g64, w64 = g.double(), w0.double()
    m, v = (1 - b1) * g64, (1 - b2) * g64 * g64
    new = w64 - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    acc = float_quantize(new.float(), 8, 7, rounding="nearest")
    assert_bits_equal(opt.weight_acc[p], acc)
    assert_bits_equal(p.detach(), fixed_point_quantize(acc, 8, 6, rounding="nearest"))
    state = opt.optim.state[p]
    assert_bits_equal(state["exp_avg"], float_quantize(m.float(), 5, 2, rounding="nearest"))
    assert_bits_equal(state["exp_avg_sq"], float_quantize(v.float(), 5, 2, rounding="nearest"))
    assert torch.equal(p.grad, g)  # no grad_quant: the gradient is left alone


def test_optimlp_details():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    calls = []

    def counting(t):
        calls.append(t.shape)
        return t

    # SGD without momentum has no momentum buffer: momentum_quant is not called
    opt = OptimLP(torch.optim.SGD(model.parameters(), lr=0.1), momentum_quant=counting)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert calls == []
    # the closure is evaluated (QPyTorch ignored it); parameters without a gradient are skipped
    opt = OptimLP(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        grad_quant=counting,
        momentum_quant=counting,
        weight_quant=counting,
        acc_quant=counting,
    )
    opt.zero_grad()
    model.bias.requires_grad_(False)

    def closure():
        loss = model(torch.ones(1, 3)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert model.bias.grad is None
    assert calls.count(torch.Size([2, 3])) == 4  # grad, acc, weight, momentum of the weight
    # the learning rate is shared with the wrapped optimizer, and schedulers work
    opt.param_groups[0]["lr"] = 0.5
    assert opt.optim.param_groups[0]["lr"] == 0.5
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure)
    sched.step()
    assert opt.optim.param_groups[0]["lr"] == 0.25
    # state_dict: the wrapped optimizer's state and the accumulators
    state = opt.state_dict()
    acc = [a.clone() for a in state["weight_acc"]]
    other = OptimLP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), acc_quant=counting)
    other.load_state_dict(state)
    assert all(torch.equal(other.weight_acc[p], a) for p, a in zip(model.parameters(), acc, strict=False))
    assert "momentum_buffer" in other.optim.state[model.weight]
    assert repr(opt).startswith("LP Optimizer: SGD")


@pytest.mark.parametrize("on", ["optimlp", "wrapped"])
def test_optimlp_param_group_added_later_gets_accumulators(on):
    """A group added after construction (fine-tuning: unfreeze a layer) gets its accumulators at its first step."""
    w0, v0 = f32([0.3, -1.7, 0.05]), f32([2.2, -0.4])
    g, h = f32([0.11, -0.37, 0.9]), f32([0.5, -1.3])
    w, v = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(v0.clone())
    opt = OptimLP(
        torch.optim.SGD([w], lr=0.1, momentum=0.9),
        weight_quant=_nearest(FixedPoint(8, 4)),
        acc_quant=_nearest(FloatingPoint(8, 7)),
    )
    (opt if on == "optimlp" else opt.optim).add_param_group({"params": [v], "lr": 0.2})
    assert len(opt.param_groups) == len(opt.optim.param_groups) == 2
    w.grad, v.grad = g.clone(), h.clone()
    opt.step()
    acc_v = float_quantize(v0 - 0.2 * h, 8, 7, rounding="nearest")  # the accumulator started as v0
    assert_bits_equal(opt.weight_acc[v], acc_v)
    assert_bits_equal(v.detach(), fixed_point_quantize(acc_v, 8, 4, rounding="nearest"))
    assert_bits_equal(opt.weight_acc[w], float_quantize(w0 - 0.1 * g, 8, 7, rounding="nearest"))
    # state_dict holds every accumulator, also of a group added since the last step
    u = torch.nn.Parameter(f32([1.5]))
    opt.add_param_group({"params": [u]})
    accs = opt.state_dict()["weight_acc"]
    assert [tuple(a.shape) for a in accs] == [(3,), (2,), (1,)]
    assert_bits_equal(accs[2], f32([1.5]))


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: FixedPoint(30, 4), "wl"),
        (lambda: FixedPoint(8, 4, clamp="yes"), "clamp"),
        (lambda: FixedPoint(8, 4, symmetric=1), "symmetric"),
        (lambda: FloatingPoint(0, 3), "exp"),
        (lambda: FloatingPoint(9, 3), "exp"),
        (lambda: FloatingPoint(5, 24), "man"),
        (lambda: BlockFloatingPoint(0), "wl"),
        (lambda: BlockFloatingPoint(8, dim=-2), "dim"),
        (lambda: BlockFloatingPoint(8, dim="a"), "dim"),
        (lambda: fixed_point_quantize(torch.ones(2), 8, 4, rounding="up"), "rounding"),
        (lambda: float_quantize(torch.ones(2), 5, 2, rounding="nearest_even"), "rounding"),
        (lambda: block_quantize(torch.ones(2, 2), 8, dim=2), "dim"),
        (lambda: Quantizer(forward_number="fixed(8,4)"), "forward_number"),
        (lambda: Quantizer(backward_number=lp.FixedPoint(8, 4)), "backward_number"),
        (lambda: Quantizer(FixedPoint(8, 4), forward_rounding="Nearest"), "forward_rounding"),
        (lambda: quantizer(backward_rounding=None), "backward_rounding"),
        (lambda: quantizer(FloatingPoint(5, 2), clamping_grad_zero=True), "clamping_grad_zero"),
        (lambda: quantizer(FixedPoint(8, 4, clamp=False), clamping_grad_zero=True), "clamping_grad_zero"),
        (lambda: quantizer(clamping_grad_zero="yes"), "clamping_grad_zero"),
        (lambda: quantizer(backward_hooks=[1]), "backward_hooks"),
        (lambda: quantizer(backward_hooks=len), "backward_hooks"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_bad_optimlp_arguments():
    params = [torch.nn.Parameter(torch.ones(2))]
    sgd = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="optim"):
        OptimLP(torch.optim.RMSprop(params))
    with pytest.raises(ValueError, match="weight_quant"):
        OptimLP(sgd, weight_quant=3)
    with pytest.raises(ValueError, match="acc_quant"):
        OptimLP(sgd, acc_quant=FixedPoint(8, 4))
    for bad in (0, -1.0, "2", True, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_scaling"):
            OptimLP(sgd, grad_scaling=bad)
    assert isinstance(OptimLP(torch.optim.AdamW(params)), torch.optim.Optimizer)  # AdamW is an Adam
    with pytest.raises(TypeError, match="x must be"):
        float_quantize([1.0], 5, 2)
