"""Activation checkpointing of noisy code: noisekernels.checkpoint's recomputation draws the forward's
noise, so its gradients equal those of the same run without checkpointing bit for bit; torch's own
checkpoint, whose recomputation would draw new noise (a wrong gradient), is refused with a clear
error, in eager mode and under torch.compile."""

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import noisekernels as nk
from noisekernels.ops._streams import default_stream


class Block(nn.Module):
    """Every kind of noise draw: a Gaussian layer, Random Spiking, a learnable scale (its own gradient)
    and a functional call on the default stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 16)
        self.gaussian = nk.nn.GaussianNoise(0.5, seed=1)
        self.spike = nk.nn.RandomSpike(keep=0.7, seed=2)
        self.learnable = nk.nn.LearnableNoise((16,), init=0.3, seed=3)

    def forward(self, x):
        h = self.learnable(self.spike(self.gaussian(self.linear(x))))
        return torch.tanh(h) + nk.functional.noise_add(x, 0.1)


def _offsets(block):
    return [s.offset.clone() for s in (*[m for m in block.modules() if isinstance(m, nk.Stream)], default_stream())]


def _set_offsets(block, offsets):
    with torch.no_grad():
        for s, o in zip((*[m for m in block.modules() if isinstance(m, nk.Stream)], default_stream()), offsets):
            s.offset.copy_(o)


def _grads(block, x, run, backwards=1):
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = run(x)
    for i in range(backwards):
        y.square().sum().backward(retain_graph=i < backwards - 1)
    return y.detach(), [x.grad, *[p.grad for p in block.parameters()]]


@pytest.fixture
def case():
    block, x = Block(), torch.randn(4, 16)
    start = _offsets(block)
    y, grads = _grads(block, x, block)
    return block, x, start, y, grads, _offsets(block)


def test_gradients_equal_the_run_without_checkpointing(case):
    block, x, start, y_ref, grads_ref, end_ref = case
    _set_offsets(block, start)
    y, grads = _grads(block, x, lambda t: nk.checkpoint(block, t))
    assert torch.equal(y, y_ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
    assert all(torch.equal(a, b) for a, b in zip(_offsets(block), end_ref))  # the recomputation reserved nothing


def test_each_backward_recomputes_the_same_noise(case):
    block, x, start, _, grads_ref, _ = case
    _set_offsets(block, start)
    _, grads = _grads(block, x, lambda t: nk.checkpoint(block, t), backwards=2)
    assert all(torch.equal(g, 2 * r) for g, r in zip(grads, grads_ref))


def test_nested_checkpoints_replay_the_outer_forward(case):
    block, x, start, _, grads_ref, _ = case
    _set_offsets(block, start)
    _, grads = _grads(block, x, lambda t: nk.checkpoint(lambda u: nk.checkpoint(block, u) * 1.0, t))
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


def test_recomputation_runs_under_the_forwards_replica_settings():
    """Inside `nk.replicas(2)` Random Spiking takes min/max per replica; the backward (and so the
    recomputation) runs after the block has closed. The linear layer's weight gradient reads its
    (recomputed) input, the spiked values."""
    torch.manual_seed(0)
    spike, linear = nk.nn.RandomSpike(keep=0.5, seed=4), nn.Linear(8, 4)
    x = torch.cat([torch.randn(3, 8), 10 + torch.randn(3, 8)])
    grads = []
    for run in (lambda t: linear(spike(t)), lambda t: nk.checkpoint(lambda u: linear(spike(u)), t)):
        with torch.no_grad():
            spike.stream.offset.zero_()
        linear.zero_grad(set_to_none=True)
        with nk.replicas(2):
            y = run(x)
        y.sum().backward()
        grads.append(linear.weight.grad)
    assert torch.equal(grads[0], grads[1])


def test_without_grad_it_runs_the_function_once(case):
    block, x, start, y_ref, _, end_ref = case
    _set_offsets(block, start)
    with torch.no_grad():
        assert torch.equal(nk.checkpoint(block, x), y_ref)
    assert all(torch.equal(a, b) for a, b in zip(_offsets(block), end_ref))


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_is_refused(case, reentrant):
    block, x, *_ = case
    y = torch.utils.checkpoint.checkpoint(block, x.requires_grad_(), use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="drew new noise during a backward pass.*noisekernels.checkpoint"):
        y.sum().backward()


def test_torch_checkpoint_under_compile_is_refused(case):
    """Inductor's partitioner reruns a checkpointed region's offset snapshot in the backward graph, on
    the offset the forward already advanced: refused there too."""
    block, x, *_ = case
    step = torch.compile(lambda t: torch.utils.checkpoint.checkpoint(block, t, use_reentrant=False),
                         backend="aot_eager")
    y = step(x.requires_grad_())
    with pytest.raises(RuntimeError, match="drew new noise during a backward pass"):
        y.sum().backward()


def test_a_recomputation_with_other_noise_calls_is_refused():
    layer, calls = nk.nn.GaussianNoise(0.1, seed=1), []

    def changing(x):  # draws for 4 rows the first time, 2 rows when recomputed
        calls.append(1)
        return layer(x if len(calls) == 1 else x[:2]).square().sum()  # square saves its input: a recomputation

    y = nk.checkpoint(changing, torch.randn(4, 3, requires_grad=True))
    with pytest.raises(RuntimeError, match="recomputation's noise calls differ from the forward's"):
        y.backward()


@pytest.mark.parametrize("kwarg", [{"use_reentrant": True}, {"context_fn": lambda: (None, None)}])
def test_own_arguments_are_not_overridden(kwarg):
    with pytest.raises(ValueError, match="sets (use_reentrant|context_fn) itself"):
        nk.checkpoint(lambda t: t, torch.ones(1), **kwarg)


def test_the_engines_first_call_inside_a_region_replays_only_its_real_draws():
    """The MC engine's first call on a model probes its plan: noise drawn and the streams put back.
    The recomputation finds the plan cached and makes only the real calls, which must get the real
    calls' noise, not the probe's (the second chunk got the first chunk's noise: a wrong gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nk.nn.GaussianNoise(0.5, mc=True, seed=7),
                          nk.nn.RandomSpike(0.6, mc=True, seed=8), nn.Linear(8, 3)).eval()
    linear, x = nn.Linear(8, 8), torch.randn(2, 8)
    streams = [m for m in model.modules() if isinstance(m, nk.Stream)]
    start = [s.offset.clone() for s in streams]
    region = lambda t: nk.ensemble.replica_logits(model, t, 4, chunk=2)  # noqa: E731
    grads = []
    for run in (region, lambda t: nk.checkpoint(region, t)):
        with torch.no_grad():
            for s, o in zip(streams, start):
                s.offset.copy_(o)
        nk.ensemble._plans.pop(model, None)  # each run probes its plan inside the region
        x_ = x.clone().requires_grad_()
        run(linear(x_)).square().sum().backward()
        grads.append(x_.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_seed_changed_in_place_before_the_backward_is_not_replayed():
    """The recomputation draws with the seed the forward used, also when the stream was reseeded in
    place between the forward and the backward (distributed.reseeded puts the seeds back on exit)."""
    from noisekernels.distributed import reseeded

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nk.nn.GaussianNoise(0.5, seed=7), nk.nn.RandomSpike(0.6, seed=8))
    x = torch.randn(2, 8)
    with reseeded(model, 5, 0):  # the reference: the backward runs while the seeds are changed
        model(x).square().sum().backward()
    want = model[0].weight.grad
    model.zero_grad(set_to_none=True)
    with reseeded(model, 5, 0):
        y = nk.checkpoint(model, x)
    y.square().sum().backward()
    assert torch.equal(model[0].weight.grad, want)


def test_noise_meant_for_the_backward_is_drawn_inside_fresh_noise_in_backward():
    """Noise added to a gradient in a hook is new noise of the backward, not a recomputation: refused
    by default (the refusal cannot tell it from one), drawn inside fresh_noise_in_backward(), where it
    is the stream's next draw, as in a forward."""
    torch.manual_seed(0)
    linear, x, stream = nn.Linear(4, 3), torch.randn(2, 4), nk.Stream(5)
    clean = torch.autograd.grad(linear(x).sum(), linear.weight)[0]
    want = nk.functional.noise_add(clean, 0.1, stream=nk.Stream(5))  # the hook's draw, from a copy of the stream

    hook = linear.weight.register_hook(lambda g: nk.functional.noise_add(g, 0.1, stream=stream))
    with pytest.raises(RuntimeError, match="drew new noise during a backward pass.*fresh_noise_in_backward"):
        linear(x).sum().backward()
    hook.remove()
    assert stream.offset.item() == 0  # the refused draw reserved nothing

    def noisy_grad(g):
        with nk.fresh_noise_in_backward():
            return nk.functional.noise_add(g, 0.1, stream=stream)

    linear.weight.register_hook(noisy_grad)
    linear.weight.grad = None
    linear(x).sum().backward()
    assert torch.equal(linear.weight.grad, want)
    layer = nk.nn.GaussianNoise(0.1, seed=1)
    y = torch.utils.checkpoint.checkpoint(lambda t: layer(t).square(), x.requires_grad_(), use_reentrant=False)
    with pytest.raises(RuntimeError, match="drew new noise during a backward pass"):  # only inside the block
        y.sum().backward()
