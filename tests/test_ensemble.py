"""Batched MC ensembles and EOT gradients equal the loop of n separate passes (same streams), for
every defense; replicas are independent; plans, chunks, votes and errors."""

import math

import pytest
import torch
from torch import nn

import noisekernels as nk
from loop_reference import loop_eot, loop_logits, restore, snapshot
from models import MODELS, A2SNN, RS1, SkipNet, weight_noise_net
from noisekernels import ensemble

EXPECTED_MODES = {"rs1": "shared", "rse": "shared", "pni": "shared", "a2snn": "shared", "a2snn-batch": "shared",
                  "skip": "replicate", "weight-noise": "loop"}


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()




@pytest.mark.parametrize("name", list(MODELS))
def test_mc_logits_equal_the_loop(name):
    model, x = _model(name), torch.rand(5, 1, 28, 28)
    assert ensemble.plan(model, x, 7, chunk=7).mode == EXPECTED_MODES[name]  # the structure, chunk fixed
    start = snapshot(model)
    batched = ensemble.mc_predict(model, x, 7, reduce="none")
    after = snapshot(model)
    restore(model, start)
    loop = loop_logits(model, x, 7)
    assert batched.shape == (7, 5, 10)
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot(model)))  # streams advance as the loop's
    assert not torch.allclose(batched[0], batched[1])  # replicas differ


@pytest.mark.parametrize("name", list(MODELS))
def test_eot_grad_equals_the_loop(name):
    model, x, y = _model(name), torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    start = snapshot(model)
    grad, loss = ensemble.eot_grad(model, nn.functional.cross_entropy, x, y, 6)
    restore(model, start)
    ref_grad, ref_loss = loop_eot(model, x, y, 6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunks_give_the_same_result(chunk):
    model, x = _model("rs1"), torch.rand(5, 1, 28, 28)
    start = snapshot(model)
    whole = ensemble.mc_predict(model, x, 7, reduce="none", chunk=7)
    restore(model, start)
    torch.testing.assert_close(ensemble.mc_predict(model, x, 7, reduce="none", chunk=chunk), whole, rtol=1e-5, atol=1e-6)


def test_reductions_follow_the_logits():
    model, x = _model("rse"), torch.rand(6, 1, 28, 28)
    start = snapshot(model)
    logits = ensemble.mc_predict(model, x, 9, reduce="none")
    for reduce in ("mean", "vote"):
        restore(model, start)
        got = ensemble.mc_predict(model, x, 9, reduce=reduce)
        expected = torch.softmax(logits, -1).mean(0) if reduce == "mean" else \
            nn.functional.one_hot(logits.argmax(-1), 10).sum(0).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_vote_ties_go_to_the_smaller_index():
    logits = torch.zeros(4, 2, 5)
    logits[0, 0, 3] = logits[1, 0, 1] = 1  # one vote each for 3 and 1, two ties at 0
    logits[:, 1, 4] = logits[:, 1, 2] = 2  # every replica ties 2 and 4
    votes = nk.ops.replica_reduce.replica_reduce(logits, "vote")
    assert votes[0].tolist() == [2, 1, 0, 1, 0] and votes[1].tolist() == [0, 0, 4, 0, 0]
    assert votes.argmax(1).tolist() == [0, 2]


def test_replicas_are_independent_and_the_mean_tightens():
    model, x = _model("rse"), torch.rand(1, 1, 28, 28)

    def spread(n, repeats=40):
        return torch.stack([ensemble.mc_predict(model, x, n)[0] for _ in range(repeats)]).std(0).mean().item()

    ratio = spread(4) / spread(64)
    assert 2.5 < ratio < 6.5  # 1/sqrt(n): sqrt(64 / 4) = 4


def test_prefix_sharing_runs_the_backbone_once():
    model, x = _model("a2snn"), torch.rand(5, 1, 28, 28)
    rows = []
    model.backbone.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))  # a hook is state: set first
    ensemble.plan(model, x, 50, chunk=50)  # the tuning's passes
    rows.clear()
    ensemble.mc_predict(model, x, 50, chunk=50)
    assert rows == [5]


def test_batch_statistics_in_training_mode_are_refused():
    model = SkipNet().train()
    with pytest.raises(ValueError, match="BatchNorm2d at 'bn' is in training mode: its batch statistics would mix "
                                         r"replicas; call model.eval\(\)"):
        ensemble.mc_predict(model, torch.rand(2, 1, 8, 8), 3)
    model.eval()
    assert ensemble.mc_predict(model, torch.rand(2, 1, 8, 8), 3).shape == (2, 10)
    model.bn.track_running_stats = False  # batch statistics in eval mode too: not a call to eval()
    with pytest.raises(ValueError, match="BatchNorm2d at 'bn' has track_running_stats=False, so it uses batch "
                                         "statistics even in eval mode"):
        ensemble.mc_predict(model, torch.rand(2, 1, 8, 8), 3)


def test_deterministic_prediction_and_no_noise_models():
    model, x = _model("rs1"), torch.rand(3, 1, 28, 28)
    d1 = ensemble.deterministic_predict(model, x)
    assert torch.equal(d1, ensemble.deterministic_predict(model, x)) and model.spike.mc
    clean = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    assert ensemble.plan(clean, x, 4).mode == "deterministic"
    logits = ensemble.mc_predict(clean, x, 4, reduce="none")
    assert torch.equal(logits[0], logits[3])
    grad, _ = ensemble.eot_grad(clean, nn.functional.cross_entropy, x, torch.tensor([0, 1, 2]), 4)
    assert grad.shape == x.shape


def test_bad_arguments():
    model, x = RS1().eval(), torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        ensemble.mc_predict(model, x, 0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        ensemble.mc_predict(model, x, 2, reduce="median")
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        ensemble.mc_predict(model, x, 2, chunk=0)
    with pytest.raises(ValueError, match="y must be a tensor with x's batch size 2"):
        ensemble.eot_grad(model, nn.functional.cross_entropy, x, torch.tensor([1]), 2)
    assert math.isfinite(ensemble.mc_predict(A2SNN().eval(), x, 2).sum().item())


def _assert_equals_the_loop(model, x, n, **kwargs):
    start = snapshot(model)
    batched = ensemble.mc_predict(model, x, n, reduce="none", **kwargs)
    restore(model, start)
    torch.testing.assert_close(batched, loop_logits(model, x, n), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # independent draws, never one draw repeated
    return batched


def test_switching_weight_noise_on_after_planning_replans():
    model, x = weight_noise_net().eval(), torch.rand(3, 1, 28, 28)
    layers = [m for m in model.modules() if isinstance(m, nk.nn.WeightNoise)]
    for m in layers:
        m.mc = False
    assert ensemble.plan(model, x, 4, chunk=4).mode == "shared"  # only the RandomSpike is on
    for m in layers:
        m.mc = True
    assert ensemble.plan(model, x, 4, chunk=4).mode == "loop"
    _assert_equals_the_loop(model, x, 4)


def test_swapping_a_noise_layer_after_planning_replans():
    model, x = _model("a2snn"), torch.rand(3, 1, 28, 28)
    assert ensemble.plan(model, x, 5, chunk=5).first is model.noise
    model.noise = nk.nn.AnisotropicNoise(16, init_std=2.0, draw="batch")
    assert ensemble.plan(model, x, 5, chunk=5).first is model.noise
    _assert_equals_the_loop(model, x, 5)


@pytest.mark.parametrize("chunk", [2, 4])
def test_chunks_never_share_a_weight_draw(chunk):
    model, x = _model("weight-noise"), torch.rand(3, 1, 28, 28)
    _assert_equals_the_loop(model, x, 4, chunk=chunk)


class FunctionalNoise(nn.Module):
    """Noise drawn through the functional op from a Stream the model owns: no noise layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.stream = nn.Linear(12, 16), nn.Linear(16, 4), nk.Stream(3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = nk.functional.noise_add(h, 0.5, stream=self.stream)
        return self.fc2(h)


class NoiseAfterPermute(nn.Module):
    """A RandomSpike applied where dim 0 is not the batch: per-replica min/max would take the
    wrong rows."""

    def __init__(self):
        super().__init__()
        self.fc1, self.spike, self.fc2 = nn.Linear(12, 6), nk.nn.RandomSpike(0.5, mc=True, seed=2), nn.Linear(6, 4)

    def forward(self, x):
        h = self.spike(self.fc1(x).T).T
        return self.fc2(h)


@pytest.mark.parametrize("make", [FunctionalNoise, NoiseAfterPermute], ids=["functional", "permute"])
def test_noise_the_engine_cannot_see_runs_as_the_loop(make):
    torch.manual_seed(0)
    model, x = make().eval(), torch.rand(5, 12)
    p = ensemble.plan(model, x, 4, chunk=4)
    if make is NoiseAfterPermute:  # per-replica min/max over the wrong rows: batching differs, so the loop
        assert p.mode == "loop" and p.reason.startswith("the loop: chunks of 4 replicas raised ValueError")
    _assert_equals_the_loop(model, x, 4, chunk=4)
    y = torch.tensor([0, 1, 2, 3, 0])
    start = snapshot(model)
    grad, _ = ensemble.eot_grad(model, nn.functional.cross_entropy, x, y, 4)
    restore(model, start)
    torch.testing.assert_close(grad, loop_eot(model, x, y, 4)[0], rtol=1e-4, atol=1e-6)


def test_empty_batches_give_empty_results():
    for name in MODELS:
        model = _model(name)
        x = torch.rand(0, 1, 28, 28)
        assert ensemble.mc_predict(model, x, 3).shape == (0, 10)
        assert ensemble.mc_predict(model, x, 3, reduce="none").shape == (3, 0, 10)


class PixelHead(nn.Module):
    """Outputs of shape (B, C, H, W), not (B, C)."""

    def __init__(self, noisy):
        super().__init__()
        self.noise = nk.nn.GaussianNoise(0.1) if noisy else nn.Identity()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.noise(x))


@pytest.mark.parametrize("noisy", [True, False])
def test_outputs_keep_their_shape_on_every_plan(noisy):
    model, x = PixelHead(noisy).eval(), torch.rand(2, 1, 5, 5)
    assert ensemble.mc_predict(model, x, 3, reduce="none").shape == (3, 2, 3, 5, 5)
    start = snapshot(model)
    with pytest.raises(ValueError, match=r"reduce='mean' needs \(B, C\) logits"):
        ensemble.mc_predict(model, x, 3)
    assert all(torch.equal(a, b) for a, b in zip(start, snapshot(model)))  # refused before any draw


def test_a_loss_that_is_not_a_scalar_is_refused_without_moving_the_streams():
    model, x, y = _model("rs1"), torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    loss = lambda logits, t: nn.functional.cross_entropy(logits, t, reduction="none")  # noqa: E731
    for chunk in (None, 1, 2):
        start = snapshot(model)
        with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* got \(2,\)"):
            ensemble.eot_grad(model, loss, x, y, 2, chunk=chunk)
        assert all(torch.equal(a, b) for a, b in zip(start, snapshot(model)))


def test_switching_a_dropout_to_training_after_planning_replans():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).eval(), torch.rand(4, 8)
    assert ensemble.plan(model, x, 5).mode == "deterministic"
    model.train()  # dropout from torch's RNG: noise the engine cannot batch, so the loop
    assert ensemble.plan(model, x, 5).mode == "loop"
    logits = ensemble.mc_predict(model, x, 5, reduce="none")
    assert not torch.allclose(logits[0], logits[1])
