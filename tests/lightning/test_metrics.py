"""QuantizationMetrics: quantized vs float accuracy and per-layer quantization error."""

import copy
import math
from contextlib import nullcontext

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
from lightning_lowp.metrics import QuantizationMetrics, quantization_error_stats

FMT = "fixed(4,1)"  # step 0.5, range [-4, 3.5]: coarse enough to cost accuracy


class Net(pl.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc2.weight.mul_(0.3)  # small logits: fixed(4,1) turns many into ties
        self.lr = lr

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[-1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[-1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[-1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n=60, seed=0, scale=1.0):
    """Labels mostly the float model's own predictions, so float accuracy is high."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * scale
    with torch.no_grad():
        y = Net()(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.2
    y = torch.where(flip, (y + 1) % 3, y)
    return x, y


def loader(n=60, seed=0, scale=1.0, batch_size=16):  # 60 = 16+16+16+12: a short last batch
    return DataLoader(TensorDataset(*data(n, seed, scale)), batch_size=batch_size)


def make_trainer(*callbacks, **kwargs):
    defaults = {**QUIET, "max_steps": 2, "num_sanity_val_steps": 0}
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def hand_accuracy(model, dl, quantized):
    """Top-1 accuracy computed without the callback: a fresh QuantizeActivations, by hand."""
    qa = lp.QuantizeActivations(forward=FMT)
    qa.attach(model)
    model.eval()
    correct = total = 0
    with torch.no_grad(), nullcontext() if quantized else qa.disabled():
        for x, y in dl:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    qa.detach()
    return correct / total


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


# ---- accuracy -----------------------------------------------------------------------------------


def test_validate_and_test_log_quantized_float_and_gap():
    model, dl = Net(), loader()
    float_acc, quant_acc = hand_accuracy(model, dl, False), hand_accuracy(model, dl, True)
    assert float_acc - quant_acc > 0.2, "the task must show a clear quantization gap"

    trainer = make_trainer(lp.QuantizeActivations(forward=FMT), QuantizationMetrics())
    trainer.validate(model, dl, verbose=False)
    m = trainer.callback_metrics
    assert m["val/acc_float"].item() == pytest.approx(float_acc, abs=1e-6)
    assert m["val/acc_quantized"].item() == pytest.approx(quant_acc, abs=1e-6)
    assert m["val/acc_gap"].item() == pytest.approx(quant_acc - float_acc, abs=1e-6)

    trainer.test(model, dl, verbose=False)
    m = trainer.callback_metrics
    assert m["test/acc_float"].item() == pytest.approx(float_acc, abs=1e-6)
    assert m["test/acc_quantized"].item() == pytest.approx(quant_acc, abs=1e-6)
    assert m["test/acc_gap"].item() == pytest.approx(quant_acc - float_acc, abs=1e-6)
    assert not any(mod._forward_hooks for mod in model.modules())

    # a second validate starts from zero (the metric states were reset), and logs reach loggers
    logger = RecordingLogger()
    trainer = make_trainer(lp.QuantizeActivations(forward=FMT), QuantizationMetrics(), logger=logger)
    trainer.validate(model, loader(n=20, seed=1), verbose=False)
    logged = {k: v for _, metrics in logger.calls for k, v in metrics.items()}
    dl1 = loader(n=20, seed=1)
    assert logged["val/acc_float"] == pytest.approx(hand_accuracy(model, dl1, False), abs=1e-6)
    assert logged["val/acc_quantized"] == pytest.approx(hand_accuracy(model, dl1, True), abs=1e-6)


def test_quantized_accuracy_even_when_eval_is_not_quantized_and_per_dataloader():
    model, dl0, dl1 = Net(), loader(), loader(n=24, seed=3)
    qa = lp.QuantizeActivations(forward=FMT, quantize_eval=False)
    trainer = make_trainer(qa, QuantizationMetrics())
    trainer.validate(model, [dl0, dl1], verbose=False)
    m = trainer.callback_metrics
    for i, dl in enumerate((dl0, dl1)):
        assert m[f"val/acc_float/dataloader_idx_{i}"].item() == pytest.approx(hand_accuracy(model, dl, False), abs=1e-6)
        assert m[f"val/acc_quantized/dataloader_idx_{i}"].item() == pytest.approx(
            hand_accuracy(model, dl, True), abs=1e-6
        )
    assert qa.quantize_eval is False  # restored after each quantized pass


def test_batch_fn_and_forward_fn():
    x, y = data()
    dl = DataLoader(TensorDataset(x, torch.zeros(len(x)), y), batch_size=16)  # (x, extra, y)
    model = Net()
    cb = QuantizationMetrics(batch_fn=lambda b: (b[0], b[2]), forward_fn=lambda m, inputs: -m(inputs))
    trainer = make_trainer(lp.QuantizeActivations(forward=FMT), cb)
    trainer.validate(model, dl, verbose=False)
    with torch.no_grad():
        expected = ((-model(x)).argmax(1) == y).float().mean().item()  # negated logits: forward_fn used
    assert trainer.callback_metrics["val/acc_float"].item() == pytest.approx(expected, abs=1e-6)

    with pytest.raises(TypeError, match="batch_fn"):  # a triple without batch_fn
        make_trainer(lp.QuantizeActivations(forward=FMT), QuantizationMetrics()).validate(model, dl, verbose=False)


def test_without_quantize_activations_warns_once_and_logs_equal_accuracies():
    model, dl = Net(), loader()
    cb = QuantizationMetrics(every_n_steps=1)
    trainer = make_trainer(cb, max_steps=3)

    def fit_and_validate():
        trainer.fit(model, dl, dl)
        trainer.validate(model, dl, verbose=False)

    with pytest.warns(UserWarning, match="no QuantizeActivations callback") as record:
        fit_and_validate()
    assert sum("no QuantizeActivations" in str(w.message) for w in record) == 1
    m = trainer.callback_metrics
    assert m["val/acc_quantized"].item() == m["val/acc_float"].item()
    assert m["val/acc_gap"].item() == 0
    assert not any(k.startswith("quant/") for k in m)
    assert cb.last_layer_stats == {}


# ---- per-layer statistics -----------------------------------------------------------------------


def test_layer_stats_match_a_hand_computation_on_the_sampled_step():
    model = Net()
    dl = loader(scale=4.0)  # large inputs: some fc1 outputs beyond [-4, 3.5]
    first_x = next(iter(dl))[0]

    # by hand: the raw (pre-quantization) outputs of fc1 and fc2 on the first training batch,
    # with the upstream layers quantized as in training
    reference = copy.deepcopy(model)
    raw = {}
    handles = [
        getattr(reference, n).register_forward_hook(lambda m, a, o, n=n: raw.__setitem__(n, o.detach()))
        for n in ("fc1", "fc2")
    ]
    qa = lp.QuantizeActivations(forward=FMT)
    qa.attach(reference)  # registered after the recorders: they see the float outputs
    reference.train()
    with torch.no_grad():
        reference(first_x)
    qa.detach()
    for h in handles:
        h.remove()

    cb = QuantizationMetrics(every_n_steps=1)
    trainer = make_trainer(lp.QuantizeActivations(forward=FMT), cb, max_steps=1)
    trainer.fit(model, dl)
    assert cb.last_sampled_step == 0
    for name in ("fc1", "fc2"):
        x = raw[name]
        q = lp.quantize(x, FMT)
        saturated = ((x > 3.5) | (x < -4.0)).double().mean().item()
        flushed = ((x != 0) & (q == 0)).double().mean().item()
        sqnr = 10 * math.log10((x.double() ** 2).sum().item() / ((x.double() - q.double()) ** 2).sum().item())
        got = cb.last_layer_stats[name]
        assert got["saturated"] == pytest.approx(saturated, abs=1e-12), name
        assert got["flushed"] == pytest.approx(flushed, abs=1e-12), name
        assert got["sqnr_db"] == pytest.approx(sqnr, rel=1e-6), name
        for key in ("saturated", "flushed", "sqnr_db"):
            assert trainer.callback_metrics[f"quant/{name}/{key}"].item() == pytest.approx(got[key], rel=1e-6)
    assert 0 < cb.last_layer_stats["fc1"]["saturated"] < 1  # the test exercises both counts
    assert 0 < cb.last_layer_stats["fc1"]["flushed"] < 1
    assert not any(mod._forward_hooks for mod in model.modules())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_n_steps_controls_sampling(accumulate, monkeypatch):
    import lightning_lowp.metrics as metrics_module

    logger = RecordingLogger()
    cb = QuantizationMetrics(every_n_steps=3)
    computed = []  # the step each time a layer's statistics are computed
    original = metrics_module._error_sums

    def spy(x, q, fmt):
        computed.append((cb._sampling_step, tuple(x.shape)))
        return original(x, q, fmt)

    monkeypatch.setattr(metrics_module, "_error_sums", spy)
    trainer = make_trainer(
        lp.QuantizeActivations(forward=FMT),
        cb,
        max_steps=7,
        logger=logger,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=50,
    )
    trainer.fit(Net(), loader(n=120, batch_size=8))
    steps = [step for step, metrics in logger.calls if "quant/fc1/sqnr_db" in metrics]
    assert steps == [0, 3, 6]
    # fc1 and fc2 once each, on one batch (the first micro-batch) of each sampled step
    assert computed == [(s, shape) for s in (0, 3, 6) for shape in ((8, 16), (8, 3))]
    assert {"quant/fc1/saturated", "quant/fc1/flushed", "quant/fc2/sqnr_db"} <= set(logger.calls[0][1])

    computed.clear()
    logger = RecordingLogger()
    none = QuantizationMetrics(every_n_steps=None)
    make_trainer(lp.QuantizeActivations(forward=FMT), none, max_steps=3, logger=logger).fit(Net(), loader())
    assert not any(k.startswith("quant/") for _, metrics in logger.calls for k in metrics)
    assert computed == []


def test_quantization_error_stats_ranges():
    # fixed(4,1): range [-4, 3.5]; -3.9 rounds to -4 but is inside the range, so not saturated
    x = torch.tensor([-4.2, 3.7, -3.9, 0.2, 0.25, 1.0, float("inf"), 0.0])
    q = lp.quantize(x, "fixed(4,1)")
    assert q.tolist() == [-4.0, 3.5, -4.0, 0.0, 0.0, 1.0, 3.5, 0.0]
    s = quantization_error_stats(x, q, "fixed(4,1)")
    assert s["saturated"] == 3 / 8
    assert s["flushed"] == 2 / 8
    finite = torch.isfinite(x)
    expected = 10 * math.log10((x[finite].double() ** 2).sum() / ((x - q)[finite].double() ** 2).sum())
    assert s["sqnr_db"] == pytest.approx(expected, rel=1e-6)  # squares summed from float32
    # symmetric: -4.2 -> -3.5 and -3.9 -> -3.5, both beyond the range end -3.5
    sym = lp.FixedPoint(4, 1, symmetric=True)
    assert quantization_error_stats(x, lp.quantize(x, sym), sym)["saturated"] == 4 / 8
    # no clamping: no range, nothing saturates
    free = lp.FixedPoint(4, 1, clamp=False)
    assert quantization_error_stats(x[finite], lp.quantize(x[finite], free), free)["saturated"] == 0
    # exact: infinite SQNR
    assert quantization_error_stats(q[finite], q[finite], "fixed(4,1)")["sqnr_db"] == math.inf

    # block floating point: the range is per block. bfp(4, block_size=2):
    # block [1.9, 0.1]: E=0, step 0.25, limit 1.75 -> 1.9 saturates, 0.1 is flushed;
    # block [7.9, 6.5]: E=2, step 1, limit 7 -> 7.9 saturates; 6.5 -> 6 is inside the range.
    x = torch.tensor([[1.9, 0.1], [7.9, 6.5]])
    q = lp.quantize(x, "bfp(4,block_size=2)")
    assert q.tolist() == [[1.75, 0.0], [7.0, 6.0]]
    s = quantization_error_stats(x, q, "bfp(4,block_size=2)")
    assert s["saturated"] == 2 / 4
    assert s["flushed"] == 1 / 4
    # one block per column (dim=1): both columns have E=2, limit 7 -> only 7.9 saturates
    for fmt in (lp.BlockFloatingPoint(4, dim=1), lp.BlockFloatingPoint(4)):  # and the whole tensor
        q = lp.quantize(x, fmt)
        assert q.tolist() == [[2.0, 0.0], [7.0, 6.0]]
        s = quantization_error_stats(x, q, fmt)
        assert s["saturated"] == 1 / 4
        assert s["flushed"] == 1 / 4
    # one block per row (dim=0) is the block_size=2 case here
    q = lp.quantize(x, lp.BlockFloatingPoint(4, dim=0))
    assert quantization_error_stats(x, q, lp.BlockFloatingPoint(4, dim=0))["saturated"] == 2 / 4

    # floating point: fp8_e4m3 saturates at 448 and flushes below half its smallest subnormal
    x = torch.tensor([500.0, -1000.0, 448.0, 1e-4, 1.0])
    s = quantization_error_stats(x, lp.quantize(x, "fp8_e4m3"), "fp8_e4m3")
    assert s["saturated"] == 2 / 5
    assert s["flushed"] == 1 / 5
    # IEEE overflow to Inf counts as saturated, and the SQNR is -inf
    x = torch.tensor([70000.0, 1.0])
    s = quantization_error_stats(x, lp.quantize(x, "fp16"), "fp16")
    assert s["saturated"] == 1 / 2
    assert s["sqnr_db"] == -math.inf


# ---- training undisturbed, arguments ------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_training_is_unchanged_by_the_callback(rounding):
    def run(with_metrics):
        pl.seed_everything(0, verbose=False)
        model = Net(lr=0.2)
        callbacks = [lp.QuantizeActivations(forward="fixed(6,3)", forward_rounding=rounding, backward="bf16")]
        if with_metrics:
            callbacks.append(QuantizationMetrics(every_n_steps=1))
        make_trainer(*callbacks, max_steps=6, val_check_interval=2, limit_val_batches=2).fit(model, loader(), loader())
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    (params_a, rng_a), (params_b, rng_b) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=False))
    assert torch.equal(rng_a, rng_b)


def test_bad_arguments_raise():
    for bad in (0, -3, 2.5, True, "5"):
        with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
            QuantizationMetrics(every_n_steps=bad)
    with pytest.raises(TypeError, match="batch_fn must be callable"):
        QuantizationMetrics(batch_fn=3)
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        QuantizationMetrics(forward_fn="forward")
    two = make_trainer(
        lp.QuantizeActivations(forward=FMT), lp.QuantizeActivations(forward="bf16"), QuantizationMetrics()
    )
    with pytest.raises(ValueError, match="one QuantizeActivations callback; the trainer has 2"):
        two.validate(Net(), loader(), verbose=False)
    float_targets = QuantizationMetrics(batch_fn=lambda b: (b[0], b[1].float()))
    with pytest.raises(TypeError, match="integer class indices"):
        make_trainer(lp.QuantizeActivations(forward=FMT), float_targets).validate(Net(), loader(), verbose=False)
    wrong_shape = QuantizationMetrics(batch_fn=lambda b: (b[0], b[1][:, None]))
    with pytest.raises(ValueError, match="targets have shape"):
        make_trainer(lp.QuantizeActivations(forward=FMT), wrong_shape).validate(Net(), loader(), verbose=False)
    with pytest.raises(ValueError, match="same shape"):
        quantization_error_stats(torch.zeros(3), torch.zeros(4), "bf16")


@pytest.mark.parametrize(
    "spec", ["bfp(8)", "bfp(6,dim=1)", "bfp(6,dim=-3)", "bfp(5,block_size=4)", "bfp(5,dim=0,block_size=3)"]
)
def test_block_limits_from_block_maxima_match_the_reference_per_element(spec):
    from lightning_lowp.metrics import _block_limit
    from lightning_lowp.reference import block_range

    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(6, 5, 7, generator=g)
        * torch.rand(6, 5, 7, generator=g) ** 4
        * 2.0 ** torch.randint(-20, 20, (6, 5, 7), generator=g)
    )
    x[0, 0, 0], x[1, 2, 3] = float("inf"), float("nan")
    x[:, 4] = 0.0  # all-zero blocks along dim 1
    fmt = lp.parse_format(spec)
    expected = block_range(x.abs().double(), fmt)[1].float()
    assert torch.equal(torch.broadcast_to(_block_limit(x, fmt), x.shape), expected)


# ---- models that do not classify ----------------------------------------------------------------


class Regression(Net):
    """One output, float targets: no accuracy to speak of."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]).squeeze(1), batch[1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", F.mse_loss(self(batch[0]).squeeze(1), batch[1]))


def regression_loader(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)


def test_a_model_that_does_not_classify_fails_before_training_and_accuracy_false_logs_layer_stats():
    steps = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = make_trainer(
        lp.QuantizeActivations(forward=FMT), QuantizationMetrics(), CountSteps(), max_epochs=1, max_steps=-1,
        num_sanity_val_steps=1,
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"integer class indices.*QuantizationMetrics\(accuracy=False\)"):
        trainer.fit(Regression(), regression_loader(), regression_loader())
    assert steps == []  # Lightning's sanity check ran a batch; no training epoch was wasted

    cb = QuantizationMetrics(every_n_steps=1, accuracy=False)
    trainer = make_trainer(lp.QuantizeActivations(forward=FMT), cb, max_steps=2, num_sanity_val_steps=1)
    model = Regression()
    trainer.fit(model, regression_loader(), regression_loader())
    assert {"quant/fc1/sqnr_db", "quant/fc2/sqnr_db"} <= set(trainer.callback_metrics)
    assert set(cb.last_layer_stats) == {"fc1", "fc2"}
    trainer.validate(model, regression_loader(), verbose=False)
    assert set(trainer.callback_metrics) == {"val_loss"}  # no accuracies
    with pytest.raises(ValueError, match="accuracy=False with every_n_steps=None leaves nothing to log"):
        QuantizationMetrics(every_n_steps=None, accuracy=False)
    with pytest.raises(ValueError, match="accuracy must be True or False"):
        QuantizationMetrics(accuracy="no")
