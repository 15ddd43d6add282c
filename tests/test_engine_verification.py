"""The engine on models it was not designed for (issue 22): every plan it picks equals the loop of n
passes from the same streams, whatever the model does; tuning moves no stream; the measured choice
changes speed, never values; streams stay distinct under threads; the MC mean is exact at large n."""

import threading

import pytest
import torch
from torch import nn

import noisekernels as nk
from loop_reference import loop_eot, loop_logits, restore, snapshot
from models import MODELS, SkipNet
from noisekernels import ensemble
from noisekernels.ops.replica_reduce import replica_reduce

F = nn.functional




def _assert_mc_equals_the_loop(model, x, n, **kwargs):
    start = snapshot(model)
    got = ensemble.mc_predict(model, x, n, reduce="none", **kwargs)
    after = snapshot(model)
    restore(model, start)
    torch.testing.assert_close(got, loop_logits(model, x, n), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot(model)))  # the streams moved as the loop's
    return got


def _assert_eot_equals_the_loop(model, x, y, n, loss_fn=F.cross_entropy, **kwargs):
    start = snapshot(model)
    grad, loss = ensemble.eot_grad(model, loss_fn, x, y, n, **kwargs)
    restore(model, start)
    ref_grad, ref_loss = loop_eot(model, x, y, n, loss_fn)
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
    start = snapshot(model)
    measured = ensemble.mc_predict(model, x, 12, reduce="none")
    for chunk in (1, 5, 12):
        restore(model, start)
        torch.testing.assert_close(ensemble.mc_predict(model, x, 12, reduce="none", chunk=chunk), measured,
                                   rtol=1e-5, atol=1e-6)


def test_fixed_chunk_fixes_this_threads_calls_and_repeats_them_bit_for_bit():
    model, x = MODELS["rse"]().eval(), torch.rand(4, 1, 28, 28)
    start = snapshot(model)
    with ensemble.fixed_chunk(5):
        assert ensemble.plan(model, x, 12).chunk == 5 and ensemble.plan(model, x, 12, chunk=3).chunk == 3
        with ensemble.fixed_chunk(4):
            assert ensemble.plan(model, x, 12).chunk == 4
        seen = []
        other = threading.Thread(target=lambda: seen.append(ensemble.plan(model, x, 12, grad=True).chunk))
        other.start(), other.join()
        first = ensemble.mc_predict(model, x, 12, reduce="none")
        restore(model, start)
        assert torch.equal(ensemble.mc_predict(model, x, 12, reduce="none"), first)
    # another thread measured as if nothing were fixed (12's ladder has no 5), and so does this one after
    assert seen == [ensemble.plan(model, x, 12, grad=True).chunk] and seen != [5]
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        with ensemble.fixed_chunk(0):
            pass


def test_close_candidates_are_settled_by_real_calls_that_equal_the_loop(monkeypatch):
    monkeypatch.setattr(ensemble, "_CLOSE", float("inf"))  # the two fastest trials always go to real calls
    model, x = MODELS["rse"]().eval(), torch.rand(4, 1, 28, 28)
    plan = ensemble.plan(model, x, 10)
    contenders = sorted(plan.times, key=plan.times.get)[:2]
    for _ in range(3):  # two sampling calls (one per contender), then the chosen chunk
        _assert_mc_equals_the_loop(model, x, 10)
    assert sorted(plan.call_times) == sorted(contenders)
    assert plan.chunk == min(plan.call_times, key=plan.call_times.get)
    assert plan.mode == ("loop" if plan.chunk == 1 else plan.structure)
    assert (f"chunks of {plan.chunk} replicas" in plan.reason) or (plan.chunk == 1 and "loop" in plan.reason)


def test_candidate_chunks_about_double_from_1_to_n_and_divide_n_where_they_can():
    for n in range(1, 300):
        sizes = ensemble._sizes(n, None)
        assert sizes[0] == 1 and sizes[-1] == n and sizes == sorted(set(sizes)), n
        assert len(sizes) <= 2 + n.bit_length(), n  # few candidates: tuning stays cheap
        for last, k in zip(sizes, sizes[1:]):
            assert 2 * last <= k <= 4 * last or k == n, (n, sizes)
            assert n % k == 0 or not any(n % d == 0 for d in range(2 * last, min(4 * last, n) + 1)), (n, sizes)
    assert ensemble._sizes(10, None) == [1, 2, 5, 10] and ensemble._sizes(50, None) == [1, 2, 5, 10, 25, 50]
    assert ensemble._sizes(12, 3) == [1, 3] and ensemble._sizes(2, 5) == [1, 2]  # a fixed chunk: it and the loop


def test_tuning_moves_no_stream_and_the_plan_says_what_it_measured():
    model, x = MODELS["rs1"]().eval(), torch.rand(4, 1, 28, 28)
    start = snapshot(model)
    plan = ensemble.plan(model, x, 8, grad=True)
    assert all(torch.equal(a, b) for a, b in zip(start, snapshot(model)))
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


# ---- the classes a review found (each against the loop: values and final stream offsets) ----------

class RareFunctionalNoise(nn.Module):
    """Noise through a functional op whose effect two passes rarely show."""

    def __init__(self):
        super().__init__()
        self.fc, self.s = nn.Linear(8, 4), nk.Stream(1)

    def forward(self, x):
        h = self.fc(x)
        return h + (nk.functional.noise_add(torch.zeros_like(h), 1.0, stream=self.s) > 3.5).float() * 10


class PrefixFunctionalNoise(nn.Module):
    """A tiny functional draw before the first noise layer: prefix sharing would share it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.noise, self.fc2 = nn.Linear(8, 16), nk.nn.GaussianNoise(0.3, seed=2), nn.Linear(16, 4)
        self.s = nk.Stream(3)

    def forward(self, x):
        h = nk.functional.noise_add(self.fc1(x), 1e-7, stream=self.s)
        return self.fc2(self.noise(torch.relu(h)))


class ConfigSwitch(nn.Module):
    """Noise switched on through a config object and a buffer, not a plain attribute."""

    def __init__(self):
        super().__init__()
        self.fc1, self.noise, self.fc2 = nn.Linear(8, 16), nk.nn.GaussianNoise(0.5, seed=4), nn.Linear(16, 4)
        self.cfg = type("Config", (), {})()
        self.cfg.noisy = False
        self.register_buffer("centre", torch.tensor(False))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.cfg.noisy:
            h = self.noise(h)
        if self.centre:
            h = h - h.mean(0, keepdim=True)
        return self.fc2(h)


def _assert_both_equal_the_loop(model, x, n, **kwargs):
    _assert_mc_equals_the_loop(model, x, n, **kwargs)
    _assert_eot_equals_the_loop(model, x, torch.arange(x.shape[0]) % 4, n, **kwargs)


@pytest.mark.parametrize("make", [RareFunctionalNoise, PrefixFunctionalNoise], ids=["rare", "prefix"])
def test_draws_the_model_makes_outside_the_layers_are_counted(make):
    torch.manual_seed(0)
    model, x = make().eval(), torch.rand(4, 8)
    _assert_both_equal_the_loop(model, x, 40)
    assert ensemble.plan(model, x, 40).mode != "deterministic"


def test_switches_inside_config_objects_and_buffers_are_part_of_the_key():
    torch.manual_seed(0)
    model, x = ConfigSwitch().eval(), torch.rand(4, 8)
    _assert_mc_equals_the_loop(model, x, 6)
    model.cfg.noisy = True
    got = _assert_mc_equals_the_loop(model, x, 6)
    assert not torch.allclose(got[0], got[1])
    model.load_state_dict({**model.state_dict(), "centre": torch.tensor(True)})  # in place: same buffer object
    _assert_mc_equals_the_loop(model, x, 6)
    model.fc2.__class__ = type("Centring", (nn.Linear,), {"forward": lambda self, h: nn.Linear.forward(
        self, h - h.mean(0, keepdim=True))})
    _assert_mc_equals_the_loop(model, x, 6)


class RunningNorm(nn.Module):
    """Updates its own statistics in every forward, even in eval mode."""

    def __init__(self):
        super().__init__()
        self.noise, self.fc = nk.nn.GaussianNoise(0.3, seed=5), nn.Linear(8, 4)
        self.register_buffer("mean", torch.zeros(8))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.mean.mul_(0.5).add_(0.5 * x.mean(0))
        return self.fc(self.noise(x - self.mean))


def test_a_model_that_changes_itself_runs_as_the_loop_and_changes_as_often():
    torch.manual_seed(0)
    model, x = RunningNorm().eval(), torch.rand(3, 8)
    state = (model.mean.clone(), model.calls)
    got = ensemble.mc_predict(model, x, 4, reduce="none")
    after = (model.mean.clone(), model.calls)
    model.mean.copy_(state[0])
    model.calls = state[1]
    model.noise.stream.offset.zero_()
    torch.testing.assert_close(got, loop_logits(model, x, 4))
    assert torch.equal(after[0], model.mean) and after[1] == model.calls == 4
    assert "changes RunningNorm.mean in its forward" in ensemble.plan(model, x, 4).reason


def test_tuning_leaves_torchs_generator_as_it_was():
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.Linear(32, 3)).train()
    x = torch.rand(4, 8)
    torch.manual_seed(1)
    got = ensemble.mc_predict(model, x, 5, reduce="none")  # first call: tuned, then the loop
    torch.manual_seed(1)
    torch.testing.assert_close(got, loop_logits(model, x, 5))


class OddBatchBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.noise, self.fc2 = nn.Linear(8, 16), nk.nn.GaussianNoise(0.5, seed=1), nn.Linear(16, 4)

    def forward(self, x):
        h = self.noise(torch.relu(self.fc1(x)))
        return self.fc2(h * 2 if h.shape[0] % 3 == 0 and h.shape[0] > 2 else h)


@pytest.mark.parametrize("chunk", [None, 4])
def test_the_last_smaller_chunk_is_verified_too(chunk):
    torch.manual_seed(0)
    _assert_both_equal_the_loop(OddBatchBranch().eval(), torch.rand(2, 8), 7, chunk=chunk)


class MixingWithALargeColumn(nn.Module):
    """Rows mixed, and one output column of 1e5: a tolerance scaled to the largest output hid the mix."""

    def __init__(self):
        super().__init__()
        self.fc, self.noise = nn.Linear(8, 4), nk.nn.GaussianNoise(0.2, seed=6)

    def forward(self, x):
        h = self.fc(self.noise(x))
        h = h + 0.1 * h.mean(0, keepdim=True)
        return torch.cat([h, torch.full_like(h[:, :1], 1e5)], 1)


def test_the_verification_tolerance_is_per_element():
    torch.manual_seed(0)
    model, x = MixingWithALargeColumn().eval(), torch.rand(3, 8)
    _assert_mc_equals_the_loop(model, x, 6)
    assert ensemble.plan(model, x, 6).mode == "loop"


def test_an_empty_batch_with_weight_noise_draws_as_the_loop():
    model = MODELS["weight-noise"]().eval()
    _assert_mc_equals_the_loop(model, torch.rand(0, 1, 28, 28), 3)


def test_a_failing_call_gives_its_draws_back():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nk.nn.GaussianNoise(0.5, seed=1), nn.Linear(16, 4)).eval(), torch.rand(3, 8)
    calls = []

    def refused_on_the_sixth_draw(out, t):
        calls.append(1)
        loss = F.cross_entropy(out, t, reduction="none")
        return loss if len(calls) == 6 else loss.mean()

    for loss_fn, y, error in [(F.cross_entropy, torch.tensor([[0, 1], [1, 2], [2, 3]]), RuntimeError),
                              (F.cross_entropy, torch.tensor([0, 1, 7]), IndexError),
                              (refused_on_the_sixth_draw, torch.tensor([0, 1, 2]), ValueError)]:
        start = snapshot(model)
        with pytest.raises(error):
            ensemble.eot_grad(model, loss_fn, x, y, 8, chunk=4)
        assert all(torch.equal(a, b) for a, b in zip(start, snapshot(model)))


def test_a_given_back_draw_never_takes_another_threads_counters():
    stream, starts, stop = nk.Stream(0), [], threading.Event()

    def reserve():
        while not stop.is_set():
            starts.append(int(stream.reserve(3)[1]))

    worker = threading.Thread(target=reserve)
    worker.start()
    try:
        for _ in range(3000):
            start = stream.reserve(5)[1]
            stream.release(start, 5)
    finally:
        stop.set()
        worker.join()
    assert len(starts) == len(set(starts))  # a release that raced a reservation would hand its counters out again


def test_a_compiled_model_runs_as_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nk.nn.GaussianNoise(0.5, seed=1), nn.Linear(16, 4)).eval()
    compiled, x = torch.compile(model, fullgraph=True, backend="eager"), torch.rand(3, 8)
    start = snapshot(model)
    got = ensemble.mc_predict(compiled, x, 4, reduce="none")
    after = snapshot(model)
    restore(model, start)
    torch.testing.assert_close(got, loop_logits(model, x, 4), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot(model)))
    assert "torch.compile'd model runs as the loop" in ensemble.plan(compiled, x, 4).reason
