"""Randomized smoothing against an implementation written here from Cohen et al.'s pseudocode
(PREDICT and CERTIFY, section 3.2 / locuslab/smoothing): the same decisions and radii from the
same counts, the same counts from the same noise as the paper's sampling loop, and counts
statistically consistent with that loop on torch.randn noise."""

import numpy as np
import pytest
import torch
from scipy import stats

import noisekernels as nk
from attack_models import make_data, trained
from noisekernels import certify as smoothing

SIGMA = 0.75


def paper_predict(counts, alpha):
    """PREDICT: abstain unless BinomPValue(nA, nA + nB, 0.5) <= alpha (two-sided exact test)."""
    order = np.argsort(-counts, kind="stable")
    n_a, n_b = counts[order[0]], counts[order[1]]
    p_value = min(1.0, 2 * stats.binom.cdf(min(n_a, n_b), n_a + n_b, 0.5))
    return -1 if p_value > alpha else int(order[0])


def paper_certify(counts0, counts, sigma, alpha):
    """CERTIFY: cA from the selection counts, pA = LowerConfBound(nA, n, 1 - alpha), radius
    sigma * Phi^-1(pA), abstain below 0.5."""
    c_a = int(np.argmax(counts0))
    n = int(counts.sum())
    p_a = stats.binomtest(int(counts[c_a]), n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    return (-1, 0.0) if p_a < 0.5 else (c_a, sigma * stats.norm.ppf(p_a))


def paper_sample_counts(model, x, sigma, n, batch, noise):
    """The paper's sampling loop (locuslab/smoothing's _sample_noise) for a batch of inputs:
    repeat, add noise(shape) * sigma, count the base classifier's argmax on the host."""
    counts = np.zeros((x.shape[0], 4), dtype=np.int64)
    remaining = n
    while remaining:
        m = min(batch, remaining)
        remaining -= m
        rows = x.repeat(m, 1, 1, 1)
        pred = model(rows + noise(rows.shape) * sigma).argmax(1).view(m, -1)
        for i in range(x.shape[0]):
            counts[i] += np.bincount(pred[:, i].numpy(), minlength=4)
    return counts


def test_same_decisions_and_radii_from_the_same_counts():
    g = np.random.default_rng(0)
    counts = g.multinomial(1000, g.dirichlet(np.full(4, 0.4), size=300))
    counts = np.concatenate([counts, [[1000, 0, 0, 0], [500, 500, 0, 0], [0, 0, 0, 1000], [505, 495, 0, 0]]])
    counts0 = g.multinomial(100, (counts + 1) / (counts + 1).sum(1, keepdims=True))
    for alpha in (0.001, 0.05):
        pred = smoothing.predict_from_counts(torch.from_numpy(counts), alpha)
        assert pred.tolist() == [paper_predict(c, alpha) for c in counts]
        cert, radius = smoothing.certify_from_counts(torch.from_numpy(counts0), torch.from_numpy(counts), SIGMA, alpha)
        ref = [paper_certify(c0, c, SIGMA, alpha) for c0, c in zip(counts0, counts)]
        assert cert.tolist() == [r[0] for r in ref]
        np.testing.assert_allclose(radius.numpy(), [r[1] for r in ref], rtol=1e-9, atol=1e-12)
        assert (cert == -1).any() and (cert != -1).any()


def test_counts_equal_the_paper_loop_on_the_same_noise():
    model = trained()
    x, _ = make_data(6, 1)
    seed, n, per_pass = 11, 300, 40
    ours = smoothing.sample_counts(model, x, SIGMA, n, nk.Stream(seed), batch_size=per_pass * x.shape[0])
    stream = nk.Stream(seed)
    ref = paper_sample_counts(model, x, SIGMA, n, per_pass,
                              lambda shape: nk.random.normal(shape, stream=stream))
    assert ours.dtype == torch.int64 and (ours.sum(1) == n).all()
    np.testing.assert_array_equal(ours.numpy(), ref)
    assert (ours.amax(1) < n).any()  # the noise changes predictions: the counts say something


def test_counts_consistent_with_the_paper_loop_on_randn():
    model = trained()
    x, _ = make_data(6, 2)
    n = 2000
    ours = smoothing.sample_counts(model, x, SIGMA, n, nk.Stream(3), batch_size=1000).numpy()
    g = torch.Generator().manual_seed(0)
    ref = paper_sample_counts(model, x, SIGMA, n, 500, lambda shape: torch.randn(shape, generator=g))
    mixed = 0
    for a, b in zip(ours, ref):
        table = np.stack([a, b])[:, (a + b) > 0]
        if table.shape[1] > 1:
            mixed += 1
            assert stats.chi2_contingency(table).pvalue > 1e-4
    assert mixed >= 2


def test_certify_and_predict_are_the_paper_procedures_on_the_engine_counts():
    model = trained()
    x, y = make_data(8, 3)
    pred, radius = smoothing.certify(model, x, SIGMA, 50, 500, 0.001, stream=nk.Stream(5))
    s = nk.Stream(5)
    c0 = smoothing.sample_counts(model, x, SIGMA, 50, s).numpy()
    c = smoothing.sample_counts(model, x, SIGMA, 500, s).numpy()
    ref = [paper_certify(a, b, SIGMA, 0.001) for a, b in zip(c0, c)]
    assert pred.tolist() == [r[0] for r in ref]
    np.testing.assert_allclose(radius.numpy(), [r[1] for r in ref], rtol=1e-9)
    assert (pred == y).sum() >= 6
    votes = smoothing.predict(model, x, SIGMA, 500, 0.001, stream=nk.Stream(6))
    counts = smoothing.sample_counts(model, x, SIGMA, 500, nk.Stream(6)).numpy()
    assert votes.tolist() == [paper_predict(c, 0.001) for c in counts]


def test_sharded_dataset_equals_one_process():
    model = trained(spike=True)  # the base classifier's own noise is reseeded per batch too
    x, y = make_data(10, 4)
    args = (model, x, y, SIGMA, 20, 100, 0.01)
    whole = smoothing.certify_dataset(*args, inputs_per_batch=3, seed=9)
    parts = [smoothing.certify_dataset(*args, inputs_per_batch=3, seed=9, rank=r, world=2) for r in (0, 1)]
    joined = {k: torch.cat([p[k] for p in parts]) for k in whole}
    order = joined["index"].argsort()
    for k in whole:
        assert torch.equal(joined[k][order], whole[k]), k
    assert whole["index"].tolist() == list(range(10)) and torch.equal(whole["correct"], whole["prediction"] == y)
    other = smoothing.certify_dataset(*args, inputs_per_batch=3, seed=10)
    assert not torch.equal(other["radius"], whole["radius"])


def test_certified_accuracy_and_plot(tmp_path):
    results = {"radius": torch.tensor([0.0, 0.3, 0.6, 1.2], dtype=torch.float64),
               "correct": torch.tensor([False, True, True, False])}
    assert smoothing.certified_accuracy(results, [0.0, 0.3, 0.5, 1.0]) == [0.5, 0.5, 0.25, 0.0]
    path = smoothing.plot_certified_accuracy(results, tmp_path / "curve.png")
    assert path.stat().st_size > 1000


def test_bad_arguments():
    model = trained()
    x, _ = make_data(2, 1)
    with pytest.raises(ValueError, match=r"alpha must be a float in \(0, 1\)"):
        smoothing.predict(model, x, SIGMA, 10, 0.0, stream=1)
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        smoothing.certify(model, x, -1.0, 10, 10, 0.01, stream=1)
    with pytest.raises(ValueError, match="n0 must be an int >= 1"):
        smoothing.certify(model, x, SIGMA, 0, 10, 0.01, stream=1)
    with pytest.raises(TypeError, match="stream must be a Stream, an int seed or None"):
        smoothing.predict(model, x, SIGMA, 10, 0.01, stream="x")
