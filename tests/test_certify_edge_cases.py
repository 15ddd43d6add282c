"""Certification and vote-style predictions at their edges, against oracles written here: a sample
whose logits are all NaN votes for no class (an all-NaN model abstains, it is never "certified"),
a one-class model gets Cohen et al.'s exact answer, an empty batch gives empty results."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import noisekernels as nk
from noisekernels import certify as smoothing
from noisekernels import metrics
from noisekernels.functional import noise_add

SIGMA, ALPHA = 0.5, 0.01


class AllNaN(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 3), math.nan)


class NaNAboveHalf(nn.Module):
    """Class 1 where the (noisy) first feature is <= 0.5, all-NaN logits above it."""

    def forward(self, x):
        logits = torch.tensor([0.0, 1.0, 0.0]).repeat(x.shape[0], 1)
        return torch.where(x.flatten(1)[:, :1] > 0.5, math.nan, logits)


class OneClass(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))


def cohen_certify(n_a, n, sigma, alpha):
    """(certified?, radius) of CERTIFY with nA of the n samples drawn voting for the guess."""
    p_a = stats.beta.ppf(alpha, n_a, n - n_a + 1) if n_a else 0.0
    return (p_a >= 0.5, sigma * stats.norm.ppf(p_a) if p_a >= 0.5 else 0.0)


def test_an_all_nan_model_abstains_and_is_never_right():
    x, y = torch.rand(6, 4), torch.zeros(6, dtype=torch.long)
    model = AllNaN()
    assert smoothing.sample_counts(model, x, SIGMA, 50, nk.Stream(0)).sum() == 0
    pred, radius = smoothing.certify(model, x, SIGMA, 10, 200, ALPHA, stream=0)
    assert pred.tolist() == [smoothing.ABSTAIN] * 6 and radius.tolist() == [0.0] * 6
    assert smoothing.predict(model, x, SIGMA, 200, ALPHA, stream=0).tolist() == [smoothing.ABSTAIN] * 6
    results = smoothing.certify_dataset(model, x, y, SIGMA, 10, 200, ALPHA, inputs_per_batch=3)
    assert smoothing.certified_accuracy(results, [0.0]) == [0.0]  # class 0 is the label: still never right
    for mode in metrics.MODES:
        assert metrics.predict(model, x, mode=mode, n=5).tolist() == [metrics.NO_CLASS] * 6
        assert metrics.accuracy(model, x, y, mode=mode, n=5) == 0


def test_nan_samples_count_against_the_top_class():
    x = torch.rand(5, 4) * 0.6  # some noisy copies cross 0.5, some not
    n = 400
    model = NaNAboveHalf()
    counts = smoothing.sample_counts(model, x, SIGMA, n, nk.Stream(3), batch_size=n * 5)
    # oracle: the same noisy rows (one pass draws them all), counted one by one
    noisy = noise_add(x, SIGMA, stream=nk.Stream(3), replicas=n).view(n, 5, 4)
    voting = (noisy[:, :, 0] <= 0.5).sum(0)
    assert counts[:, 1].tolist() == voting.tolist() and counts[:, [0, 2]].sum() == 0
    assert 0 < int(voting.min()) and int(voting.max()) < n  # both kinds of sample occur
    counts0 = torch.zeros_like(counts)
    counts0[:, 1] = 1
    pred, radius = smoothing.certify_from_counts(counts0, counts, SIGMA, ALPHA, n=n)
    expected = [cohen_certify(int(k), n, SIGMA, ALPHA) for k in voting]
    assert pred.tolist() == [1 if ok else smoothing.ABSTAIN for ok, _ in expected]
    np.testing.assert_allclose(radius.numpy(), [r for _, r in expected], rtol=1e-12)
    # the rows' own sums would pretend the NaN samples were never drawn: a larger radius
    _, generous = smoothing.certify_from_counts(counts0, counts, SIGMA, ALPHA)
    assert (generous >= radius).all() and (generous > radius).any()


def test_vote_counts_and_decide_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, 4, generator=g)
    logits[torch.rand(7, 5, generator=g) < 0.3] = math.nan  # whole rows
    logits[0, 0, 2] = math.nan  # one entry: it never wins, the row still votes
    logits[:, 4] = math.nan  # an input no replica votes for
    expected = torch.zeros(5, 4, dtype=torch.long)
    for r in range(7):
        for b in range(5):
            row = logits[r, b]
            if not row.isnan().all():
                expected[b, int(torch.where(row.isnan(), -math.inf, row).argmax())] += 1
    votes = metrics.vote_counts(logits)
    assert torch.equal(votes, expected)
    decided = metrics.decide(votes, votes=True)
    assert decided[4] == metrics.NO_CLASS and decided[:4].tolist() == expected[:4].argmax(1).tolist()


def test_a_one_class_model_gets_the_exact_answer():
    x = torch.rand(3, 4)
    model = OneClass()
    n = 100
    pred, radius = smoothing.certify(model, x, SIGMA, 10, n, ALPHA, stream=0)
    # every sample votes for class 0: pA's lower bound is alpha ** (1 / n)
    assert pred.tolist() == [0, 0, 0]
    np.testing.assert_allclose(radius.numpy(), SIGMA * stats.norm.ppf(ALPHA ** (1 / n)), rtol=1e-9)
    assert smoothing.predict(model, x, SIGMA, n, ALPHA, stream=0).tolist() == [0, 0, 0]
    # 5 votes against none: p-value 2 * 0.5**5 = 0.0625 > alpha, so PREDICT abstains
    few = smoothing.predict_from_counts(torch.tensor([[5], [0]]), ALPHA)
    assert few.tolist() == [smoothing.ABSTAIN, smoothing.ABSTAIN]


def test_an_empty_batch_gives_empty_results():
    x, y = torch.rand(0, 4), torch.zeros(0, dtype=torch.long)
    model = OneClass()
    assert smoothing.sample_counts(model, x, SIGMA, 100, nk.Stream(0)).shape == (0, 1)
    pred, radius = smoothing.certify(model, x, SIGMA, 10, 100, ALPHA, stream=0)
    assert pred.shape == radius.shape == (0,) and radius.dtype == torch.float64
    assert smoothing.predict(model, x, SIGMA, 100, ALPHA, stream=0).shape == (0,)
    results = smoothing.certify_dataset(model, x, y, SIGMA, 10, 100, ALPHA)
    assert all(v.shape == (0,) for v in results.values())
    [empty] = smoothing.certified_accuracy(results, [0.0])
    assert math.isnan(empty) and empty.total == 0


def test_bad_sample_count_is_a_clear_error():
    counts = torch.tensor([[3, 1]])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        smoothing.certify_from_counts(counts, counts, SIGMA, ALPHA, n=0)
