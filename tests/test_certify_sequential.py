"""Sequential randomized smoothing against the exact oracle of a linear base classifier: the
smoothed classifier of f(x) = [w.x + b > 0] has pA = Phi(D / sigma) and certified radius exactly
D, the distance to the hyperplane (Cohen et al. 2019: Theorem 1 is tight there). Hundreds of
independent certifications of one point (copies of it in one batch draw independent noise) give the share of
false certificates (wrong class or radius above D), which must stay within alpha's binomial slack,
for both modes and for fixed-N certify as a control; a procedure that peeks at every look without
correcting alpha fails the same check."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import noisekernels as nk
from noisekernels import certify as smoothing
from noisekernels import distributed
from noisekernels.replicas import current as replicas_in_pass

SIGMA, ALPHA, TRIALS = 1.0, 0.1, 400  # a large alpha: false certificates are common enough to count
P_A = 0.9
D = SIGMA * stats.norm.ppf(P_A)  # the point's distance to the hyperplane: its exact certified radius
N_MAX, FIRST_LOOK = 4000, 32
ROWS = TRIALS * N_MAX  # noisy rows per pass: one pass per look


class Halfplane(nn.Module):
    """Class 1 where x[0] > 0 (the hyperplane x[0] = 0), class 0 elsewhere; counts the rows it sees."""

    rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        z = x.flatten(1)[:, :1]
        return torch.cat([-z, z], 1)


def point(distance=D, copies=TRIALS):
    return torch.tensor([[distance, 0.0]]).repeat(copies, 1)


def false_certificates(pred, radius):
    """Certificates the oracle refutes: a class other than 1, or a radius above the distance D."""
    issued = pred != smoothing.ABSTAIN
    return int((issued & ((pred != 1) | (radius > D + 1e-12))).sum())


def slack(trials=TRIALS):
    """The most false certificates a valid procedure shows, but with probability 1e-3."""
    return stats.binom.ppf(1 - 1e-3, trials, ALPHA)


def test_the_schedule_doubles_up_to_n_max():
    assert smoothing.look_schedule(32, 4000) == [32, 64, 128, 256, 512, 1024, 2048, 4000]
    assert smoothing.look_schedule(100, 100) == [100] and smoothing.look_schedule(500, 100) == [100]
    for first_look, n_max, name in ((0, 100, "first_look"), (-5, 100, "first_look"), (1.5, 100, "first_look"),
                                    (10, 0, "n_max")):  # the first two used to loop forever
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            smoothing.look_schedule(first_look, n_max)


def test_a_sampler_returning_impossible_votes_is_a_clear_error():
    guess = torch.zeros(2, dtype=torch.long)
    for draw in (lambda active, m: torch.full((len(active),), m + 1),  # more votes than samples: used to abstain
                 lambda active, m: torch.full((len(active),), -1),
                 lambda active, m: torch.zeros(len(active) + 1, dtype=torch.long),
                 lambda active, m: torch.full((len(active),), 0.999 * m)):  # a fraction: used to certify
        with pytest.raises(ValueError, match=r"draw\(active, m\) must return one whole count in \[0, m\] per active"):
            smoothing.sequential_from_votes(draw, guess, SIGMA, ALPHA, n_max=400)


def test_a_guess_that_is_not_a_class_is_a_clear_error():
    # an ABSTAIN guess (from predict) came back as 'prediction' ABSTAIN with radius 0.5
    for guess in (torch.tensor([1, smoothing.ABSTAIN]), torch.tensor([1.0, 0.0]), [1, 0]):
        with pytest.raises(ValueError, match=r"guess must be a \(B,\) integer tensor of class indices >= 0"):
            smoothing.sequential_from_votes(all_votes, guess, SIGMA, ALPHA, n_max=400, radius=0.5)


def all_votes(active, m):
    """A sampler whose every sample votes for the guess: the lower bound after n of them is exactly
    share ** (1 / n) (Clopper-Pearson with n successes), an oracle that needs no beta quantile."""
    return torch.full((len(active),), m, dtype=torch.long)


@pytest.mark.parametrize("k", range(8))
def test_every_look_spends_exactly_alpha_over_k(k):
    # K = 8 looks (32, 64, ..., 2048, 4000); a pA needed just below look k's bound at alpha / 8 is
    # certified there, one just above it at the next look (a larger share, alpha / 7 for instance,
    # certifies it at look k; a smaller one not even the first); above the last look's bound even
    # n_max samples all for cA fall short, which the first look already shows (ABSTAIN)
    looks, share = [32, 64, 128, 256, 512, 1024, 2048, 4000], ALPHA / 8
    for exponent, stop in ((0.995, looks[k]), (1.005, looks[k + 1] if k < 7 else None)):
        radius = SIGMA * stats.norm.ppf(share ** (1 / (exponent * looks[k])))
        pred, granted, drawn = smoothing.sequential_from_votes(all_votes, torch.ones(1, dtype=torch.long), SIGMA,
                                                               ALPHA, n_max=N_MAX, radius=radius, first_look=FIRST_LOOK)
        if stop is None:
            assert (pred.tolist(), granted.tolist(), drawn.tolist()) == ([smoothing.ABSTAIN], [0.0], [FIRST_LOOK])
        else:
            assert (pred.tolist(), granted.tolist(), drawn.tolist()) == ([1], [radius], [stop])


@pytest.mark.parametrize("k", range(8))
def test_the_largest_radius_stops_at_the_first_look_within_tolerance(k):
    # all votes for cA: the upper bound is 1, so n_max more samples give at most the radius of share ** (1 / n_max);
    # a tolerance between the gaps left at looks k - 1 and k stops at look k, with the radius of its bound
    looks, share = [32, 64, 128, 256, 512, 1024, 2048, 4000], ALPHA / 8
    gaps = [SIGMA * (stats.norm.ppf(share ** (1 / N_MAX)) - stats.norm.ppf(share ** (1 / n))) for n in looks]
    tolerance = (gaps[k] + gaps[k - 1]) / 2 if k else 2 * gaps[0]
    pred, radius, drawn = smoothing.sequential_from_votes(all_votes, torch.ones(1, dtype=torch.long), SIGMA, ALPHA,
                                                          n_max=N_MAX, tolerance=tolerance, first_look=FIRST_LOOK)
    assert pred.tolist() == [1] and drawn.tolist() == [looks[k]]
    assert radius.item() == pytest.approx(SIGMA * stats.norm.ppf(share ** (1 / looks[k])), rel=1e-9)


def test_the_largest_radius_does_not_abstain_where_n_max_samples_certify():
    # 53% of the votes for cA: a certificate of a radius below the tolerance, reached after ~2,000 samples;
    # it used to stop at 256 samples and abstain, the abstention's radius 0 being within the tolerance,
    # though the certificate is the answer (certified accuracy at radius 0 counts it)
    def share_of_votes(percent):
        return lambda active, m: torch.full((len(active),), m * percent // 100, dtype=torch.long)

    sigma, looks = SIGMA / 4, [32, 64, 128, 256, 512, 1024, 2048, 4000]
    pred, radius, drawn = smoothing.sequential_from_votes(share_of_votes(53), torch.ones(1, dtype=torch.long), sigma,
                                                          ALPHA, n_max=N_MAX, first_look=FIRST_LOOK)
    votes = sum(m * 53 // 100 for m in np.diff([0] + looks[:looks.index(drawn.item()) + 1]))
    exact = stats.binomtest(votes, drawn.item()).proportion_ci(confidence_level=1 - 2 * ALPHA / 8, method="exact").low
    assert pred.tolist() == [1] and radius.item() == pytest.approx(sigma * stats.norm.ppf(exact), rel=1e-6)
    assert 0 < radius.item() < smoothing.TOLERANCE
    # 45%: even n_max samples would abstain, which the upper bound shows before n_max
    pred, radius, drawn = smoothing.sequential_from_votes(share_of_votes(45), torch.ones(1, dtype=torch.long), sigma,
                                                          ALPHA, n_max=N_MAX, first_look=FIRST_LOOK)
    assert pred.tolist() == [smoothing.ABSTAIN] and radius.tolist() == [0.0] and drawn.item() < N_MAX


def test_the_upper_bound_is_clopper_pearsons():
    for n_a, n, alpha in ((0, 10, 0.05), (3, 10, 0.05), (10, 10, 0.05), (450, 1000, 0.001), (999, 1000, 0.1)):
        exact = stats.binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").high
        assert float(smoothing.upper_confidence_bound(n_a, n, alpha)) == pytest.approx(exact, rel=1e-9)


def test_a_radius_is_given_up_only_once_the_upper_bound_rules_it_out():
    # 45% of the votes for cA: radius 0 is out of reach, but after 32 samples pA's upper bound is still
    # well above 1/2 (n_max samples there would certify it), so sampling goes on until it is not
    def votes_45(active, m):
        return torch.full((len(active),), m * 45 // 100, dtype=torch.long)

    assert stats.binomtest(32 * 45 // 100, 32).proportion_ci(1 - 2 * ALPHA / 8, method="exact").high > 0.6
    pred, radius, drawn = smoothing.sequential_from_votes(votes_45, torch.ones(1, dtype=torch.long), SIGMA, ALPHA,
                                                          n_max=N_MAX, radius=0.0, first_look=FIRST_LOOK)
    assert pred.tolist() == [smoothing.ABSTAIN] and radius.tolist() == [0.0] and FIRST_LOOK < drawn.item() < N_MAX


def test_a_predetermined_radius_just_above_d_is_rarely_certified():
    r = D * 1.01  # Phi(r / sigma) just above pA: every certificate is false, the hardest case
    pred, radius, _ = smoothing.certify_sequential(Halfplane(), point(), SIGMA, ALPHA, n_max=N_MAX, radius=r,
                                                   first_look=FIRST_LOOK, batch_size=ROWS, stream=nk.Stream(1))
    assert false_certificates(pred, radius) <= slack()
    # the same procedure certifies a radius it should, and stops early doing so
    pred, radius, samples = smoothing.certify_sequential(Halfplane(), point(), SIGMA, ALPHA, n_max=N_MAX,
                                                         radius=D / 2, first_look=FIRST_LOOK, batch_size=ROWS,
                                                         stream=nk.Stream(2))
    assert (pred == 1).float().mean() > 0.95 and false_certificates(pred, radius) == 0
    assert samples.float().mean() < N_MAX / 4


def test_the_largest_radius_is_rarely_above_d():
    # a tolerance met at the look of 2048 samples by some trials and not others: the stopping depends
    # on the votes, as it does on real inputs
    pred, radius, samples = smoothing.certify_sequential(Halfplane(), point(), SIGMA, ALPHA, n_max=N_MAX,
                                                         tolerance=0.108, first_look=FIRST_LOOK, batch_size=ROWS,
                                                         stream=nk.Stream(3))
    assert false_certificates(pred, radius) <= slack()
    assert (pred == 1).all() and radius.mean() > 0.8 * D  # informative, not only valid
    assert samples.min() < samples.max() == 100 + N_MAX


def test_fixed_n_certify_as_a_control():
    pred, radius = smoothing.certify(Halfplane(), point(), SIGMA, 100, N_MAX, ALPHA, batch_size=ROWS, stream=nk.Stream(4))
    false = false_certificates(pred, radius)
    assert stats.binom.ppf(1e-3, TRIALS, ALPHA) <= false <= slack()  # CERTIFY's bound is close to exact


def naive_peeking(model, x, stream):
    """The uncorrected procedure: pA's (1 - ALPHA) Clopper-Pearson lower bound taken afresh at every
    look of the schedule, each with the whole alpha, and the largest radius any look gave kept."""
    guess = smoothing.sample_counts(model, x, SIGMA, 100, stream, batch_size=ROWS).argmax(1)
    votes, drawn = torch.zeros(len(x), dtype=torch.long), 0
    radius = torch.zeros(len(x), dtype=torch.float64)
    for n in smoothing.look_schedule(FIRST_LOOK, N_MAX):
        votes += smoothing.sample_counts(model, x, SIGMA, n - drawn, stream, batch_size=ROWS).gather(1, guess[:, None]).squeeze(1)
        drawn = n
        low = torch.from_numpy(stats.beta.ppf(ALPHA, votes.numpy(), n - votes.numpy() + 1))
        radius = torch.maximum(radius, SIGMA * torch.from_numpy(stats.norm.ppf(low.clamp(min=0.5).numpy())))
    return torch.where(radius > 0, guess, smoothing.ABSTAIN), radius


def test_the_check_catches_peeking_without_correction():
    pred, radius = naive_peeking(Halfplane(), point(), nk.Stream(5))
    assert false_certificates(pred, radius) > slack()


def test_the_samples_reported_are_the_samples_drawn():
    # inputs at several distances stop at different looks; a tag in feature 1 (indices 1000 apart,
    # far beyond the noise) says which input each noisy row the model sees belongs to
    distances = torch.tensor([0.05, 0.3, 0.8, 1.5, 3.0, -0.4])
    x = torch.stack([distances, 1000.0 * torch.arange(6)], 1)
    seen = torch.zeros(6, dtype=torch.long)

    class Tagged(Halfplane):
        def forward(self, rows):
            nonlocal seen
            seen += torch.bincount((rows[:, 1] / 1000).round().long(), minlength=6)
            return super().forward(rows)

    model = Tagged()
    for radius in (0.25, None):
        seen.zero_()
        model.rows = 0
        _, _, samples = smoothing.certify_sequential(model, x, SIGMA, 0.01, n_max=20_000, radius=radius, n0=50,
                                                     first_look=64, batch_size=3000, stream=nk.Stream(6))
        assert torch.equal(samples, seen) and model.rows == int(samples.sum())
        assert samples.min() < samples.max() <= 50 + 20_000


def test_inputs_leaving_the_batch_keep_their_own_guess():
    # inputs leave at different looks (at +-3 first for radius 0.5, at +-0.8 first for the largest): each
    # remaining input must still be judged against its own class (its side of the halfplane)
    x = torch.tensor([[3.0, 0.0], [0.8, 0.0], [-0.8, 0.0], [-3.0, 0.0]])
    for radius in (0.5, None):
        pred, granted, samples = smoothing.certify_sequential(Halfplane(), x, SIGMA, 0.01, n_max=20_000, radius=radius,
                                                              stream=nk.Stream(8))
        assert pred.tolist() == [1, 1, 0, 0] and samples.min() < samples.max()  # leaving at different looks
        assert (granted <= torch.tensor([3.0, 0.8, 0.8, 3.0], dtype=torch.float64)).all()


def test_an_input_is_certified_as_if_alone_whatever_shares_its_passes():
    # f of one input: a layer's batch statistic (RandomSpike's min/max) or batch-shared draw must see that
    # input only. Here f says 1 where its pass holds more than one row: alone, every input is class 0. Run
    # as replicas of the whole batch it certified class 1, and its inputs' f changed as others left.
    class RowsInPass(nn.Module):
        def forward(self, rows):
            more = rows.shape[0] // replicas_in_pass() > 1
            return torch.tensor([[0.0, 1.0 if more else -1.0]]).repeat(rows.shape[0], 1)

    x = torch.tensor([[0.5, 0.0], [3.0, 0.0], [-1.0, 0.0]])
    for radius in (0.25, None):
        alone = [smoothing.certify_sequential(RowsInPass(), x[i:i + 1], SIGMA, 0.01, n_max=1000, radius=radius,
                                              stream=nk.Stream(9)) for i in range(3)]
        together = smoothing.certify_sequential(RowsInPass(), x, SIGMA, 0.01, n_max=1000, radius=radius,
                                                stream=nk.Stream(9))
        assert together[0].tolist() == [int(a[0]) for a in alone] == [0, 0, 0]
        assert torch.equal(together[1], torch.cat([a[1] for a in alone]))
    pred, _ = smoothing.certify(RowsInPass(), x, SIGMA, 10, 200, 0.01, stream=nk.Stream(9))  # the same sampler
    assert pred.tolist() == [0, 0, 0]


def test_one_look_is_certify():
    x = torch.tensor([[0.2, 0.0], [0.9, 0.0], [-0.1, 0.0], [0.0, 0.0]])
    pred, radius, samples = smoothing.certify_sequential(Halfplane(), x, SIGMA, 0.01, n_max=2000, first_look=2000,
                                                         n0=100, stream=nk.Stream(7))
    expected = smoothing.certify(Halfplane(), x, SIGMA, 100, 2000, 0.01, stream=nk.Stream(7))
    assert torch.equal(pred, expected[0]) and torch.equal(radius, expected[1])
    assert samples.tolist() == [2100] * 4 and (pred == smoothing.ABSTAIN).any() and (pred != smoothing.ABSTAIN).any()


def test_the_dataset_and_its_shards_on_the_sequential_method():
    x = torch.tensor([[d, 0.0] for d in (0.1, 0.5, 1.0, 2.0, -0.6, -1.5, 0.02)])
    y = (x[:, 0] > 0).long()
    args = (Halfplane(), x, y, SIGMA, 50, 3000, 0.01)
    whole = smoothing.certify_dataset(*args, method="sequential", radius=0.25, inputs_per_batch=3, seed=2)
    parts = [smoothing.certify_dataset(*args, method="sequential", radius=0.25, inputs_per_batch=3, seed=2, rank=r,
                                       world=2) for r in (0, 1)]
    joined = {k: torch.cat([p[k] for p in parts]) for k in whole}
    order = joined["index"].argsort()
    assert all(torch.equal(joined[k][order], whole[k]) for k in whole)
    first = smoothing.certify_sequential(Halfplane(), x[:3], SIGMA, 0.01, n_max=3000, n0=50, radius=0.25,
                                         stream=nk.Stream(distributed.batch_seed(2, 0)))
    assert torch.equal(whole["samples"][:3], first[2]) and torch.equal(whole["radius"][:3], first[1])
    assert set(whole["radius"].tolist()) <= {0.0, 0.25} and whole["samples"].min() < whole["samples"].max()


def test_bad_arguments_are_clear_errors_that_draw_nothing():
    x, stream = point(copies=2), nk.Stream(0)
    bad = [({"radius": -0.1}, "radius must be None or a finite float >= 0"),
           ({"radius": float("nan")}, "radius must be None or a finite float >= 0"),
           ({"tolerance": 0.0}, "tolerance must be a finite float > 0"),
           ({"n_max": 0}, "n_max must be an int >= 1"),
           ({"first_look": 1.5}, "first_look must be an int >= 1"),
           ({"n0": 0}, "n0 must be an int >= 1"),
           ({"radius": 0.5, "tolerance": 0.1}, r"tolerance applies to radius=None \(the largest radius\) only")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            smoothing.certify_sequential(Halfplane(), x, SIGMA, ALPHA, stream=stream, **kwargs)
    with pytest.raises(ValueError, match=r"alpha must be a float in \(0, 1\)"):
        smoothing.certify_sequential(Halfplane(), x, SIGMA, 1.0, stream=stream)
    assert int(stream.offset) == 0
    with pytest.raises(ValueError, match="method must be 'cohen' or 'sequential'"):
        smoothing.certify_dataset(Halfplane(), x, torch.ones(2, dtype=torch.long), SIGMA, 10, 100, ALPHA, method="seq")
    with pytest.raises(ValueError, match="radius and tolerance apply to method='sequential'"):
        smoothing.certify_dataset(Halfplane(), x, torch.ones(2, dtype=torch.long), SIGMA, 10, 100, ALPHA, radius=0.5)
    with pytest.raises(ValueError, match=r"tolerance applies to radius=None \(the largest radius\) only"):
        smoothing.certify_dataset(Halfplane(), x, torch.ones(2, dtype=torch.long), SIGMA, 10, 100, ALPHA,
                                  method="sequential", radius=0.5, tolerance=0.1)
    with pytest.raises(ValueError, match="n must be an int >= 1"):  # certify_dataset's n, whichever the method
        smoothing.certify_dataset(Halfplane(), x, torch.ones(2, dtype=torch.long), SIGMA, 10, 0, ALPHA,
                                  method="sequential")


def test_a_model_of_nan_logits_abstains_at_the_first_look():
    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    for radius in (0.0, None):  # its samples vote for no class, so pA's upper bound rules out any certificate
        pred, granted, samples = smoothing.certify_sequential(Nan(), point(copies=3), SIGMA, ALPHA, radius=radius,
                                                              stream=0)
        assert pred.tolist() == [smoothing.ABSTAIN] * 3 and granted.tolist() == [0.0] * 3
        assert samples.tolist() == [100 + 100] * 3  # n0 and the first look, at the defaults


def test_an_empty_batch():
    pred, radius, samples = smoothing.certify_sequential(Halfplane(), torch.zeros(0, 2), SIGMA, ALPHA, stream=0)
    assert pred.shape == radius.shape == samples.shape == (0,)
