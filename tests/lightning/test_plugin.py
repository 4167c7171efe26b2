"""LowPrecision: the seed's OptimLP step for step, any optimizer, checkpoint-resume exactness."""

import copy
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET, on_grid
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp


class SeedNet(nn.Module):
    """The seed notebook's LeNet (F.relu, max_pool2d), with its optional quantizer `quant`
    after every layer exactly where the seed's lp_Net puts it."""

    def __init__(self, quant=None):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)
        self.quant = quant or (lambda x: x)

    def forward(self, x):
        q = self.quant
        x = q(F.relu(self.conv1(x)))
        x = q(self.pool1(x))
        x = q(F.relu(self.conv2(x)))
        x = q(self.pool2(x))
        x = q(F.relu(self.fc1(x.view(-1, 4 * 4 * 50))))
        return F.log_softmax(q(self.fc2(x)), dim=1)


class OptimLP:
    """QPyTorch's OptimLP, restated: the reference the plugin must reproduce."""

    def __init__(self, optim, weight_quant, grad_quant, momentum_quant, acc_quant):
        self.optim, self.wq, self.gq, self.mq, self.aq = optim, weight_quant, grad_quant, momentum_quant, acc_quant
        self.params = [p for g in optim.param_groups for p in g["params"]]
        self.acc = {p: p.detach().clone() for p in self.params}

    def zero_grad(self):
        self.optim.zero_grad()

    def step(self):
        for p in self.params:
            p.grad.data = self.gq(p.grad.data)
        for p in self.params:
            p.data = self.acc[p].data
        self.optim.step()
        for p in self.params:
            p.data = self.acc[p].data = self.aq(p.data).data
            p.data = self.wq(p.data).data
        for p in self.params:
            state = self.optim.state[p]
            state["momentum_buffer"] = self.mq(state["momentum_buffer"])


class Module(pl.LightningModule):
    def __init__(self, net, optimizer="sgd"):
        super().__init__()
        self.net, self.optimizer_name = net, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters())
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def batches(n=4, size=16, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def loader(data):
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    return DataLoader(TensorDataset(x, y), batch_size=len(data[0][1]), shuffle=False)


def fit(module, data, *, plugins=(), callbacks=(), max_steps=None, max_epochs=None, ckpt_path=None):
    trainer = pl.Trainer(
        max_steps=-1 if max_epochs else (max_steps or len(data)),
        max_epochs=max_epochs or 1,
        plugins=list(plugins),
        callbacks=list(callbacks),
        **QUIET,
    )
    trainer.fit(module, loader(data), ckpt_path=ckpt_path)
    return trainer


def param_bits(module):
    return [p.detach().clone().view(torch.int32) for p in module.parameters()]


def test_reproduces_the_seed_lp_net_with_optimlp_step_for_step():
    torch.manual_seed(0)
    base = SeedNet()
    data = batches()
    low = "fixed(8,7)"

    # the seed, by hand: lp_Net's quantizers and OptimLP (forward roundings only, as OptimLP applies them)
    manual = copy.deepcopy(base)
    manual.quant = lp.Quantizer(forward=low, backward=low)
    optimizer = torch.optim.SGD(manual.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = OptimLP(
        optimizer,
        weight_quant=lp.quantizer(low),
        grad_quant=lp.quantizer(low),
        momentum_quant=lp.quantizer("bf16"),
        acc_quant=lp.quantizer("bf16"),
    )
    snapshots = []
    for x, y in data:
        loss = F.cross_entropy(manual(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snapshots.append(param_bits(manual))

    # the same with an unmodified model, the plugin and the callback picked by name
    for steps in (1, len(data)):
        module = Module(copy.deepcopy(base))
        fit(
            module,
            data[:steps],
            plugins=[lp.LowPrecision.from_name("fixed8")],
            callbacks=[lp.QuantizeActivations.from_name("fixed8")],
        )
        for got, want in zip(param_bits(module.net), snapshots[steps - 1], strict=False):
            assert torch.equal(got, want), f"differs from the seed after {steps} steps"


def test_any_optimizer_state_is_quantized_and_weights_stay_on_the_grid():
    torch.manual_seed(0)
    module = Module(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10)), optimizer="adam")
    plugin = lp.LowPrecision(
        weight="fixed(8,5)",
        grad="fixed(8,8)",
        optimizer_state="float(5,3)",
        master_weight="bf16",
        grad_rounding="stochastic",
    )
    trainer = fit(module, batches(shape=(16,)), plugins=[plugin])
    optimizer = trainer.optimizers[0]
    for p in module.parameters():
        assert on_grid(p.detach(), "fixed(8,5)")
        state = optimizer.state[p]
        assert on_grid(state["exp_avg"], "float(5,3)")
        assert on_grid(state["exp_avg_sq"], "float(5,3)")
        assert state["exp_avg"].abs().sum() > 0
        assert on_grid(plugin._master_weights[p], "bf16")
    assert isinstance(trainer.precision_plugin, lp.LowPrecision)


def test_resuming_from_a_checkpoint_continues_bit_for_bit(tmp_path):
    def plugin():
        return lp.LowPrecision.from_name(
            "bfp8", grad_rounding="stochastic", weight_rounding="stochastic", master_weight=lp.FloatingPoint(8, 10)
        )

    data = batches(n=3, shape=(16,))  # 3 steps an epoch; the checkpoint is taken after epoch 1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

    torch.manual_seed(5)
    straight = Module(copy.deepcopy(net))
    fit(straight, data, plugins=[plugin()], max_epochs=2)

    torch.manual_seed(5)
    first = Module(copy.deepcopy(net))
    trainer = fit(first, data, plugins=[plugin()], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(123)  # a different global seed: the plugin's own generator state must carry the run
    resumed = Module(copy.deepcopy(net))
    fit(resumed, data, plugins=[plugin()], max_epochs=2, ckpt_path=tmp_path / "half.ckpt")

    # training moved on
    assert not all(torch.equal(a, b) for a, b in zip(param_bits(first), param_bits(straight), strict=False))
    for a, b in zip(param_bits(resumed), param_bits(straight), strict=False):
        assert torch.equal(a, b)
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert set(ckpt["LowPrecision"]["master_weights"]) == {n for n, _ in first.named_parameters()}


def test_stochastic_rounding_differs_between_seeds_and_repeats_under_one():
    data = batches(n=2, shape=(16,))

    def run(seed):
        torch.manual_seed(0)
        module = Module(nn.Sequential(nn.Linear(16, 10)))
        torch.manual_seed(seed)
        fit(module, data, plugins=[lp.LowPrecision(weight="fixed(6,4)", weight_rounding="stochastic")])
        return param_bits(module)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=False))


def test_bad_configurations_fail_before_training():
    with pytest.raises(ValueError, match="known recipes"):
        lp.LowPrecision.from_name("fixed9")
    with pytest.raises(ValueError, match="either recipe"):
        lp.LowPrecision(weight="bf16", recipe="bfp8")
    with pytest.raises(ValueError, match="grad_scale"):
        lp.LowPrecision(grad_scale=0)
    with pytest.raises(ValueError, match="unknown arguments"):
        lp.LowPrecision.from_name("bfp8", activation="bf16")
    with pytest.raises(ValueError, match="does not parse"):
        lp.LowPrecision(weight="bfp(8")
    with pytest.raises(ValueError, match="LBFGS"):
        fit(
            Module(nn.Sequential(nn.Linear(16, 10)), optimizer="lbfgs"),
            batches(n=1, shape=(16,)),
            plugins=[lp.LowPrecision(weight="bf16")],
        )


def test_grad_scale_multiplies_before_quantizing():
    torch.manual_seed(0)
    module = Module(nn.Sequential(nn.Linear(16, 10)))
    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["grad"] = [p.grad.clone() for p in pl_module.parameters()]

    data = batches(n=1, shape=(16,))
    torch.manual_seed(0)
    ref = Module(nn.Sequential(nn.Linear(16, 10)))
    x, y = data[0]
    F.cross_entropy(ref(x), y).backward()
    fit(module, data, plugins=[lp.LowPrecision(grad="fixed(12,10)", grad_scale=8.0)], callbacks=[Grab()])
    for got, p in zip(seen["grad"], ref.parameters(), strict=False):
        assert torch.equal(got, lp.quantize(p.grad * 8.0, "fixed(12,10)"))


def test_a_step_is_one_multi_tensor_call_per_role_and_allocates_nothing(monkeypatch):
    """After the first step (which allocates the master weights), the plugin's work around a step
    is one quantize_foreach_ call per role over all parameters, and allocates no tensor."""
    from torch.profiler import ProfilerActivity, profile

    import lightning_lowp.plugins as plugins

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plugin = lp.LowPrecision.from_name("bfp8")
    params = list(net.parameters())

    def step():
        x, y = batches(n=1, shape=(16,))[0]
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(net(x), y).backward()
        plugin._before_step(params)
        optimizer.step()
        plugin._after_step(optimizer, params)

    step()  # creates the master weights and the momentum buffers
    calls = []
    real = plugins.quantize_foreach_
    monkeypatch.setattr(
        plugins, "quantize_foreach_", lambda tensors, *a, **k: calls.append(len(tensors)) or real(tensors, *a, **k)
    )
    monkeypatch.setattr(lp.functional, "quantize_", lambda *a, **k: pytest.fail("per-tensor quantize_ call"))
    step()
    assert calls == [len(params)] * 4  # grads, master weights, weights, momentum buffers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        plugin._before_step(params)
        plugin._after_step(optimizer, params)
    allocated = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocated == []
    for p in params:
        assert on_grid(p.detach(), "bfp(8)")
        assert on_grid(plugin._master_weights[p], "bf16")


def test_a_plugin_reused_for_a_second_model_keeps_that_models_master_weights(tmp_path):
    """One LowPrecision fitted on model A, then on model B: B's checkpoint holds B's master
    weights, and resuming B gives B's weights back, not A's."""
    data = batches(n=2, shape=(16,))
    plug = lp.LowPrecision(weight="fixed(8,4)", master_weight="fixed(16,12)")
    torch.manual_seed(0)
    a = Module(nn.Sequential(nn.Linear(16, 10)))
    b = Module(nn.Sequential(nn.Linear(16, 10)))
    fit(a, data, plugins=[plug])
    trainer = fit(b, data, plugins=[plug])
    assert set(plug._master_weights) == set(b.parameters())  # A's are forgotten
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    saved = torch.load(tmp_path / "b.ckpt", weights_only=False)["LowPrecision"]["master_weights"]
    weight_b, weight_a = dict(b.named_parameters())["net.0.weight"], dict(a.named_parameters())["net.0.weight"]
    assert torch.equal(saved["net.0.weight"], plug._master_weights[weight_b])
    assert not torch.equal(saved["net.0.weight"], lp.quantize(weight_a.detach(), "fixed(16,12)"))
    resumed = Module(nn.Sequential(nn.Linear(16, 10)))
    fit(resumed, data, plugins=[plug], max_epochs=1, ckpt_path=tmp_path / "b.ckpt")  # nothing left to run
    assert torch.equal(plug._master_weights[dict(resumed.named_parameters())["net.0.weight"]], saved["net.0.weight"])


class Temperature(pl.LightningModule):
    """A 0-d parameter (a temperature) beside a weight, with any torch optimizer."""

    def __init__(self, optimizer):
        super().__init__()
        self.linear = nn.Linear(16, 10)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.make_optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.linear(x) / self.temperature, y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


@pytest.mark.parametrize(
    ("name", "make", "moments", "scalars"),
    [
        ("asgd", lambda ps: torch.optim.ASGD(ps, lr=0.01), ["ax"], ["eta"]),
        ("nadam", lambda ps: torch.optim.NAdam(ps, lr=0.01), ["exp_avg", "exp_avg_sq"], ["mu_product"]),
        (
            "adam_amsgrad",
            lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
            ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
            [],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_only_moment_estimates_are_quantized_and_scalars_are_left_alone(name, make, moments, scalars):
    torch.manual_seed(0)
    module = Temperature(make)
    plugin = lp.LowPrecision(optimizer_state="fixed(8,4)")
    trainer = fit(module, batches(n=3, shape=(16,)), plugins=[plugin])
    optimizer = trainer.optimizers[0]
    for p in (module.linear.weight, module.temperature):  # the 0-d parameter included
        state = optimizer.state[p]
        for key in moments:
            assert on_grid(state[key], "fixed(8,4)"), (name, key)
        for key in scalars:
            # ASGD's eta is 0.01 (it would round to 0.0 on the grid); NAdam's mu_product is a
            # product of momenta near 0.9: neither sits on the fixed(8,4) grid
            assert not on_grid(state[key], "fixed(8,4)"), (name, key)
    assert module.temperature.detach() != 1.5  # the temperature still learns (ASGD: eta not rounded to 0)


def test_moment_states_of_other_optimizers_are_tensors_shaped_like_a_parameter():
    from lightning_lowp.plugins import moment_states

    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["velocity"] = torch.ones_like(p)
                    self.state[p]["rate"] = torch.tensor(0.01)

    w, t = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(()))
    opt = Custom([w, t])
    opt.step()
    assert [s.shape for s in moment_states(opt, w)] == [torch.Size([3])]
    assert moment_states(opt, t) == []  # 0-d states of a 0-d parameter may be rates: left alone


class CountSteps(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


@pytest.mark.parametrize("role", ["weight", "grad", "optimizer_state", "master_weight"])
@pytest.mark.parametrize(
    ("fmt", "says"),
    [
        pytest.param("bfp(8,dim=1)", r"dim=1 of bfp\(8,dim=1\) is out of range", id="bfp-dim1"),
        pytest.param("mx(fp8_e4m3,32,dim=1)", r"dim=1 of mx\(fp8_e4m3,32,dim=1\) is out of range", id="mx-dim1"),
        pytest.param("fp8_blockwise_128x128", r"block=\(128, 128\) .* is a tile", id="mx-tile"),
    ],
)
def test_a_format_a_parameter_cannot_take_fails_when_training_starts(role, fmt, says):
    """bfp(8,dim=1) and tiles do not apply to a bias: said before the first batch, naming it."""
    count = CountSteps()
    module = Module(nn.Sequential(nn.Linear(16, 10)))
    plugin = lp.LowPrecision(**{role: fmt})
    match = rf"LowPrecision: {role}={re.escape(fmt)} does not apply to parameter 'net.0.bias' of shape \(10,\): {says}"
    with pytest.raises(ValueError, match=match) as info:
        fit(module, batches(n=2, shape=(16,)), plugins=[plugin], callbacks=[count])
    assert "requires_grad=False" in str(info.value)
    assert count.batches == 0


def test_formats_that_apply_to_every_parameter_train_and_later_parameters_are_checked_before_their_step():
    module = Module(nn.Sequential(nn.Linear(16, 10)))
    fit(module, batches(n=1, shape=(16,)), plugins=[lp.LowPrecision(weight="bfp(8,dim=0)", grad="mx(fp8_e4m3,4)")])
    assert on_grid(module.net[0].bias.detach(), "bfp(8,dim=0)")

    # a frozen bias is left alone, so bfp(8,dim=1) applies; unfrozen after a step, it is refused
    class Unfreeze(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            pl_module.net[0].bias.requires_grad_(True)

    module = Module(nn.Sequential(nn.Linear(16, 10)))
    module.net[0].bias.requires_grad_(False)
    count = CountSteps()
    with pytest.raises(ValueError, match=r"does not apply to parameter 'net\.0\.bias'"):
        fit(module, batches(n=3, shape=(16,)), plugins=[lp.LowPrecision(weight="bfp(8,dim=1)")],
            callbacks=[count, Unfreeze()])  # fmt: skip
    assert count.batches == 2  # the second step, the bias's first, was refused


def test_frozen_parameters_are_left_alone_in_every_role(tmp_path):
    torch.manual_seed(0)
    module = Module(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10)))
    frozen = list(module.net[0].parameters())
    for p in frozen:
        p.requires_grad_(False)  # but still in the optimizer: configure_optimizers passes self.parameters()
    before = [p.detach().clone() for p in frozen]
    plugin = lp.LowPrecision(weight="fixed(4,2)", grad="fixed(8,6)", optimizer_state="bf16", master_weight="bf16")
    trainer = fit(module, batches(n=2, shape=(16,)), plugins=[plugin])
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == 4
    for p, b in zip(frozen, before, strict=True):
        assert torch.equal(p.detach(), b)  # not quantized to fixed(4,2)
        assert not on_grid(p.detach(), "fixed(4,2)")
        assert p not in plugin._master_weights
    for p in module.net[2].parameters():
        assert on_grid(p.detach(), "fixed(4,2)")
        assert p in plugin._master_weights
    trainer.save_checkpoint(tmp_path / "frozen.ckpt")
    saved = torch.load(tmp_path / "frozen.ckpt", weights_only=False)["LowPrecision"]["master_weights"]
    assert set(saved) == {"net.2.weight", "net.2.bias"}
