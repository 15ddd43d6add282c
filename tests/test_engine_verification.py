"""The engine on models it was not designed for (issue 22): every plan it picks equals the loop of n
passes from the same streams, whatever the model does; tuning moves no stream; the measured choice
changes speed, never values; streams stay distinct under threads; the MC mean is exact at large n."""

import threading

import pytest
import torch
from torch import nn

import noisekernels as nk
from models import MODELS, SkipNet
from noisekernels import ensemble
from noisekernels.ops.replica_reduce import replica_reduce

F = nn.functional


def _streams(model):
    return [s for s in model.modules() if isinstance(s, nk.Stream)]


def _snapshot(model):
    return [s.offset.clone() for s in _streams(model)]


def _restore(model, offsets):
    for s, o in zip(_streams(model), offsets):
        s.offset.copy_(o)


def _loop(model, x, n):
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(n)])


def _loop_eot(model, loss_fn, x, y, n):
    grads, losses = [], []
    for _ in range(n):
        xi = x.detach().requires_grad_()
        loss = loss_fn(model(xi), y)
        grads.append(torch.autograd.grad(loss, xi)[0])
        losses.append(loss.detach())
    return torch.stack(grads).mean(0), torch.stack(losses).mean()


def _assert_mc_equals_the_loop(model, x, n, **kwargs):
    start = _snapshot(model)
    got = ensemble.mc_predict(model, x, n, reduce="none", **kwargs)
    after = _snapshot(model)
    _restore(model, start)
    torch.testing.assert_close(got, _loop(model, x, n), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after, _snapshot(model)))  # the streams moved as the loop's
    return got


def _assert_eot_equals_the_loop(model, x, y, n, loss_fn=F.cross_entropy, **kwargs):
    start = _snapshot(model)
    grad, loss = ensemble.eot_grad(model, loss_fn, x, y, n, **kwargs)
    _restore(model, start)
    ref_grad, ref_loss = _loop_eot(model, loss_fn, x, y, n)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


class Centring(nn.Module):
    """A plain Python flag switches batch centring on after the first call."""

    def __init__(self):
        super().__init__()
        self.fc1, self.noise, self.fc2 = nn.Linear(12, 16), nk.nn.GaussianNoise(0.3, seed=1), nn.Linear(16, 4)
        self.centre = False

    def forward(self, x):
        h = self.noise(torch.relu(self.fc1(x)))
        if self.centre:
            h = h - h.mean(0, keepdim=True)  # mixes rows: replicas may not be batched
        return self.fc2(h)


def test_a_flag_changed_after_the_first_call_is_seen():
    torch.manual_seed(0)
    model, x = Centring().eval(), torch.rand(6, 12)
    _assert_mc_equals_the_loop(model, x, 5)
    model.centre = True
    _assert_mc_equals_the_loop(model, x, 5)
    assert ensemble.plan(model, x, 5).mode == "loop"


class BatchSizeBranch(nn.Module):
    """Code that depends on the batch size: the 2-row probe of old never saw the other branch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.noise, self.fc2 = nn.Linear(12, 16), nk.nn.GaussianNoise(0.3, seed=2), nn.Linear(16, 4)

    def forward(self, x):
        h = self.noise(torch.relu(self.fc1(x)))
        if h.shape[0] > 8:
            h = h * 2
        return self.fc2(h)


@pytest.mark.parametrize("batch", [3, 5, 9])
def test_code_that_depends_on_the_batch_size_equals_the_loop(batch):
    torch.manual_seed(0)
    model, x = BatchSizeBranch().eval(), torch.rand(batch, 12)
    _assert_mc_equals_the_loop(model, x, 6)
    _assert_eot_equals_the_loop(model, x, torch.arange(batch) % 4, 6)


@pytest.mark.parametrize("p", [0.01, 0.5])
def test_torchs_own_randomness_runs_as_the_loop(p):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 3)).train()
    plan = ensemble.plan(model, torch.rand(4, 8), 6)
    assert plan.mode == "loop" and "Dropout at '2' draws from torch's own generator" in plan.reason
    assert "noisekernels.nn.RandomSpike" in plan.reason
    torch.manual_seed(1)
    got = ensemble.mc_predict(model, torch.rand(4, 8), 6, reduce="none")
    torch.manual_seed(1)
    x = torch.rand(4, 8)
    with torch.no_grad():
        ref = torch.stack([model(x) for _ in range(6)])
    torch.testing.assert_close(got, ref)  # exactly the loop's passes, one draw of torch's generator each


class ParameterNoise(nn.Module):
    """Noise on a parameter: its rows are not the batch."""

    def __init__(self):
        super().__init__()
        self.p, self.noise, self.fc = nn.Parameter(torch.randn(1, 12)), nk.nn.GaussianNoise(0.5, seed=3), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x + self.noise(self.p))


def test_noise_on_a_parameter_runs_as_the_loop():
    torch.manual_seed(0)
    model, x = ParameterNoise().eval(), torch.rand(5, 12)
    got = _assert_mc_equals_the_loop(model, x, 4)
    assert not torch.allclose(got[0], got[1])
    _assert_eot_equals_the_loop(model, x, torch.arange(5) % 4, 4)
    assert ensemble.plan(model, x, 4).mode == "loop"


ODD_MODELS = {"rs1": lambda: MODELS["rs1"](), "a2snn": lambda: MODELS["a2snn"](), "skip": SkipNet,
              "weight-noise": lambda: MODELS["weight-noise"](), "batch-branch": BatchSizeBranch}


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 7, 10])
@pytest.mark.parametrize("name", list(ODD_MODELS))
def test_every_execution_equals_the_loop(name, chunk):
    """Chunk sizes that do not divide n included: values and EOT gradients (a wrong weighting of
    the chunks' losses fails here)."""
    torch.manual_seed(0)
    model = ODD_MODELS[name]().eval()
    x = torch.rand(3, 12) if name == "batch-branch" else torch.rand(3, 1, 28, 28)
    if name == "skip":
        x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    _assert_mc_equals_the_loop(model, x, 10, chunk=chunk)
    _assert_eot_equals_the_loop(model, x, y, 10, chunk=chunk)
    summed = lambda logits, t: F.cross_entropy(logits, t, reduction="sum")  # noqa: E731 - any reduction is the loop's
    _assert_eot_equals_the_loop(model, x, y, 10, loss_fn=summed, chunk=chunk)


def test_the_measured_choice_changes_speed_never_values():
    model, x = MODELS["rse"]().eval(), torch.rand(4, 1, 28, 28)
    start = _snapshot(model)
    measured = ensemble.mc_predict(model, x, 12, reduce="none")
    for chunk in (1, 5, 12):
        _restore(model, start)
        torch.testing.assert_close(ensemble.mc_predict(model, x, 12, reduce="none", chunk=chunk), measured,
                                   rtol=1e-5, atol=1e-6)


def test_tuning_moves_no_stream_and_the_plan_says_what_it_measured():
    model, x = MODELS["rs1"]().eval(), torch.rand(4, 1, 28, 28)
    start = _snapshot(model)
    plan = ensemble.plan(model, x, 8, grad=True)
    assert all(torch.equal(a, b) for a, b in zip(start, _snapshot(model)))
    assert 1 in plan.times and len(plan.times) >= 2 and all(t > 0 for t in plan.times.values())
    assert plan.chunk in plan.times and "input gradients" in plan.verified and "4 rows" in plan.verified
    assert ensemble.plan(model, x, 8, grad=True) is plan  # cached per key
    assert ensemble.plan(model, x, 8) is not plan  # without gradient: another key


def test_two_threads_on_one_model_never_share_noise():
    model, x = MODELS["rse"]().eval(), torch.rand(3, 1, 28, 28)
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            results[i] = ensemble.mc_predict(model, x, 16, reduce="none")  # both tune the same new key
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = torch.cat(results).flatten(1)
    assert torch.cdist(rows, rows).add(torch.eye(32) * 1e9).min() > 1e-3  # 32 distinct draws


def test_the_mc_mean_is_exact_at_large_n():
    torch.manual_seed(0)
    base = torch.randn(1, 3, 10)
    logits = base + 1e-3 * torch.randn(1_000_000, 3, 10)  # near-identical replicas
    exact = torch.softmax(logits.double(), -1).mean(0)
    for backend in ("cpu", "reference"):
        got = replica_reduce(logits, "mean", backend=backend)
        assert (got.double() - exact).abs().max() < 1e-6
        assert (got.double().sum(-1) - 1).abs().max() < 1e-6
