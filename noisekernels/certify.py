"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019; locuslab/smoothing) on the engine.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) of a base classifier f.
predict: counts of n noisy samples; the top class unless a two-sided binomial test of its count
against the runner-up's (p = 0.5) has a p-value above alpha, in which case it abstains.
certify: the top class of n0 samples is the guess cA; n new samples give pA's one-sided
(1 - alpha) Clopper-Pearson lower bound; below 0.5 it abstains, else the certified L2 radius is
sigma * Phi^-1(pA). Noise is never clipped (smoothing does not clip). A sample whose logits are all
NaN votes for no class (metrics.vote_counts): it counts against pA, never for a class, so a model
that only returns NaN abstains everywhere.

certify_sequential: the same guarantee with far fewer samples on clear inputs, each input sampled in
growing batches until its answer is decided (a fixed schedule of looks, alpha split over them).

Each chunk of samples is one fused pass: noise_add writes m noisy replicas of the B inputs
(replica-major) from the stream, the base classifier runs once on the m*B rows (each a replica of
its own: f is a function of one input, so a layer's batch statistics or batch-shared draws never mix
inputs), and replica_reduce counts the votes on the device; only the final (B, C) counts reach the host
for the tests.
"""

import numpy as np
import torch
from scipy import stats

from . import distributed, ensemble
from .functional import noise_add
from .metrics import Proportion, vote_counts
from .ops.noise_add import check_scale_value
from .replicas import replicas
from .stream import Stream

ABSTAIN = -1
TOLERANCE = 0.05  # certify_sequential's default: the L2 radius more samples may still add when it stops


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
    return float(alpha)


def _stream(stream, device):
    if isinstance(stream, Stream):
        return stream
    if stream is None or (isinstance(stream, int) and not isinstance(stream, bool)):
        return Stream(stream).to(device)
    raise TypeError(f"stream must be a Stream, an int seed or None, got {type(stream).__name__}")


@torch.no_grad()
def sample_counts(model, x, sigma, n, stream, *, batch_size=1000):
    """(B, C) int64 counts of the base classifier's predictions on n samples x + N(0, sigma^2 I)
    per input (a sample with all-NaN logits counts for no class, so a row may sum to less than n).
    batch_size: noisy rows per pass (m = batch_size // B replicas, at least 1)."""
    sigma = check_scale_value(sigma, "sigma")
    _check_int(n, "n")
    _check_int(batch_size, "batch_size")
    ensemble._check_batch_statistics(model)
    per_pass = max(1, batch_size // x.shape[0]) if x.shape[0] else n  # no inputs: one empty pass, for C
    counts = None
    for start in range(0, n, per_pass):
        m = min(per_pass, n - start)
        noisy = noise_add(x, sigma, stream=stream, replicas=m)
        # every row a pass of its own (module docstring): else an input's pA would depend on the other
        # inputs, and in certify_sequential change as they leave the batch
        with replicas(m * x.shape[0] or 1):
            logits = model(noisy)
        votes = vote_counts(logits.reshape(m, x.shape[0], logits.shape[-1]))
        counts = votes if counts is None else counts + votes
    return counts


def predict_from_counts(counts, alpha):
    """Cohen et al.'s PREDICT from (B, C) counts: the top class, or ABSTAIN (always where no
    sample voted). With one class the runner-up's count is 0."""
    alpha = _check_alpha(alpha)
    c = counts.cpu()
    top2 = torch.nn.functional.pad(c, (0, max(0, 2 - c.shape[1]))).topk(2, dim=1)
    out = []
    for (n1, n2), (c1, _) in zip(top2.values.tolist(), top2.indices.tolist()):
        out.append(ABSTAIN if n1 == 0 or stats.binomtest(n1, n1 + n2, 0.5).pvalue > alpha else c1)
    return torch.tensor(out, dtype=torch.long)


def lower_confidence_bound(n_a, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on pA from n_a successes in n."""
    n_a = np.asarray(n_a, dtype=np.float64)
    bound = stats.beta.ppf(alpha, n_a, n - n_a + 1)
    return np.where(n_a == 0, 0.0, bound)


def certify_from_counts(counts0, counts, sigma, alpha, *, n=None):
    """Cohen et al.'s CERTIFY from the selection counts (n0 samples) and the estimation counts of
    n samples per input (default: each row's sum, right when every sample voted): (prediction,
    radius), the prediction ABSTAIN with radius 0 where pA's bound is below 0.5."""
    alpha = _check_alpha(alpha)
    guess = counts0.cpu().argmax(1)
    c = counts.cpu()
    n = c.sum(1).numpy() if n is None else _check_int(n, "n")
    p_a = lower_confidence_bound(c.gather(1, guess[:, None]).squeeze(1).numpy(), n, alpha)
    certified = p_a >= 0.5
    radius = np.where(certified, _radius_of(p_a, sigma), 0.0)
    pred = torch.where(torch.from_numpy(certified), guess, torch.full_like(guess, ABSTAIN))
    return pred, torch.from_numpy(radius)


def upper_confidence_bound(n_a, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound on pA from n_a successes in n."""
    n_a = np.asarray(n_a, dtype=np.float64)
    bound = stats.beta.ppf(1 - alpha, n_a + 1, n - n_a)
    return np.where(n_a >= n, 1.0, bound)


def look_schedule(first_look, n_max):
    """The estimation sample counts at which certify_sequential looks: first_look, doubling, ending
    at n_max (fixed in advance, so the union bound over its looks is set before any sample)."""
    _check_int(first_look, "first_look")
    _check_int(n_max, "n_max")
    looks = [min(first_look, n_max)]
    while looks[-1] < n_max:
        looks.append(min(2 * looks[-1], n_max))
    return looks


def _pa_needed(radius, sigma):
    """The pA whose certified radius is `radius`: Phi(radius / sigma) (1/2 for radius 0; with
    sigma 0 no positive radius is certifiable)."""
    if radius == 0:
        return 0.5
    return float(stats.norm.cdf(radius / sigma)) if sigma > 0 else 1.0


def _radius_of(p_a, sigma):
    return sigma * stats.norm.ppf(np.clip(p_a, 0.5, None))


def _check_radius(radius):
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float))
                               or not np.isfinite(radius) or radius < 0):
        raise ValueError(f"radius must be None or a finite float >= 0, got {radius!r}")
    return None if radius is None else float(radius)


def _check_tolerance(tolerance, radius):
    """The tolerance of the largest-radius mode (None: TOLERANCE); refused beside a radius, which it
    would not change."""
    if tolerance is None:
        return TOLERANCE
    if radius is not None:
        raise ValueError(f"tolerance applies to radius=None (the largest radius) only; radius={radius!r} asks "
                         f"about one radius, got tolerance={tolerance!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < float("inf"):
        raise ValueError(f"tolerance must be a finite float > 0, got {tolerance!r}")
    return float(tolerance)


def _check_sequential(alpha, sigma, n_max, radius, tolerance, first_look):
    """The checked (alpha, sigma, radius, tolerance, looks) of a sequential certification."""
    looks = look_schedule(first_look, n_max)
    radius = _check_radius(radius)
    return _check_alpha(alpha), check_scale_value(sigma, "sigma"), radius, _check_tolerance(tolerance, radius), looks


def _new_votes(draw, active, m):
    """draw's votes for the guess of the active inputs, m new samples each (checked: a wrong count would
    bias the bounds silently)."""
    votes = draw(torch.from_numpy(active), m).cpu().numpy()
    # a fraction (a mean probability times m) would pass for a count and bias the bounds
    if votes.shape != active.shape or not ((votes >= 0) & (votes <= m) & (votes == np.floor(votes))).all():
        raise ValueError(f"draw(active, m) must return one whole count in [0, m] per active input ({len(active)} "
                         f"inputs, m={m}), got {np.array2string(votes, threshold=8)}")
    return votes.astype(np.float64)


def _check_guess(guess):
    """guess as a numpy array of class indices (an ABSTAIN or a fraction would come back as a certified
    'prediction' with a radius)."""
    if not isinstance(guess, torch.Tensor) or guess.dim() != 1 or guess.is_floating_point() or (guess < 0).any():
        shown = guess if not isinstance(guess, torch.Tensor) else f"{guess.dtype} tensor of shape {tuple(guess.shape)}"
        raise ValueError(f"guess must be a (B,) integer tensor of class indices >= 0, got {shown}")
    return guess.cpu().numpy()


def _stop_at_radius(low, best, radius, sigma):
    """(certified, decided, radius granted) at a look for a predetermined radius."""
    needed = _pa_needed(radius, sigma)
    certified = low >= needed
    return certified, certified | (best < needed), np.where(certified, radius, 0.0)


def _stop_at_largest(low, best, sigma, tolerance):
    """(certified, decided, radius granted) at a look for the largest radius. An abstention is decided
    only once n_max samples could not certify either: turning it into a certificate changes the answer,
    however small the radius."""
    certified = low >= 0.5
    granted = np.where(certified, _radius_of(low, sigma), 0.0)
    settled = certified | (best < 0.5)
    return certified, settled & (_radius_of(best, sigma) - granted <= tolerance), granted


def sequential_from_votes(draw, guess, sigma, alpha, *, n_max=100_000, radius=None, tolerance=None, first_look=100):
    """The sequential decision of certify_sequential on votes: draw(active, m) returns, for the
    inputs indexed by the int64 tensor `active`, how many of m new noisy samples voted for their
    guessed class (guess, a (B,) tensor of class indices); it is called at each look with the undecided inputs
    only. Returns (prediction, radius, estimation samples drawn) per input.

    Looks at look_schedule(first_look, n_max); each of the K looks spends alpha / K (a union
    bound), so the one-sided Clopper-Pearson bounds of all looks hold together with probability
    >= 1 - alpha, and a certificate issued at any look is correct with that probability whatever
    the stopping rule did. An input stops at a look when
    - radius=r: pA's lower bound reaches Phi(r / sigma) (prediction guess, radius r), or pA's upper
      bound is so low that n_max samples at that proportion would not certify r (ABSTAIN, 0;
      abstaining is always correct, so this rule needs no share of alpha);
    - radius=None: n_max samples at the upper bound's proportion would raise the radius of the lower
      bound by at most `tolerance` (L2 units; None: TOLERANCE, refused beside a radius), and, where
      that bound is below 1/2, would not certify either (ABSTAIN, 0);
    and at the look at n_max in any case."""
    alpha, sigma, radius, tolerance, looks = _check_sequential(alpha, sigma, n_max, radius, tolerance, first_look)
    share = alpha / len(looks)
    guess = _check_guess(guess)
    votes, drawn = np.zeros(len(guess)), np.zeros(len(guess), dtype=np.int64)
    pred, radii = np.full(len(guess), ABSTAIN), np.zeros(len(guess))
    active, previous = np.arange(len(guess)), 0
    for n in looks:
        votes[active] += _new_votes(draw, active, n - previous)
        drawn[active], previous = n, n
        low = lower_confidence_bound(votes[active], n, share)
        best = lower_confidence_bound(upper_confidence_bound(votes[active], n, share) * n_max, n_max, share)
        certified, done, granted = (_stop_at_largest(low, best, sigma, tolerance) if radius is None
                                    else _stop_at_radius(low, best, radius, sigma))
        done |= n == n_max
        pred[active[done]] = np.where(certified[done], guess[active[done]], ABSTAIN)
        radii[active[done]] = granted[done]
        active = active[~done]
        if not len(active):
            break
    return torch.from_numpy(pred), torch.from_numpy(radii), torch.from_numpy(drawn)


def certify_sequential(model, x, sigma, alpha, *, n_max=100_000, radius=None, tolerance=None, n0=100, first_look=100,
                       batch_size=1000, stream=None):
    """Sequential randomized smoothing: (prediction, certified L2 radius, samples) of each input of x
    (B, ...), sampling only until the answer is clear instead of Cohen et al.'s fixed n.

    The guarantee is CERTIFY's: with probability >= 1 - alpha each returned certificate is
    correct. Selection as in Cohen et al. (2019, sec. 3.2): the top class of n0 samples is the guess
    cA, disjoint from the estimation samples. Estimation: up to n_max samples, looked at on a fixed
    geometric schedule (first_look, doubling, n_max) with alpha split equally over its looks and a
    union bound over their one-sided Clopper-Pearson bounds (scipy), the adaptive sampling of
    Horvath et al. (ICLR 2022, "Boosting Randomized Smoothing with Variance Reduced Classifiers").
    The confidence sequences of the confseq package (Howard, Waudby-Smith & Ramdas) would hold at
    every sample, but it only ships as an sdist that needs Boost and CMake to build (and pulls
    pandas), so the bounds here are scipy's; the union bound costs alpha / K at the last look instead
    of alpha (K = 11 looks at the defaults: radius 0.934 instead of 0.953 for 100,000 samples all for
    cA at sigma 0.25, alpha 0.001). radius=r asks whether r is certified (r, or ABSTAIN and 0);
    radius=None asks for the largest radius, up to `tolerance` (default TOLERANCE; sequential_from_votes
    has the stopping rules). samples: the noisy copies each input used, the n0 selection ones included.
    Inputs that are decided leave the batch: each pass of batch_size noisy rows holds undecided inputs only."""
    _check_int(n0, "n0")
    _check_int(batch_size, "batch_size")
    _check_sequential(alpha, sigma, n_max, radius, tolerance, first_look)
    stream = _stream(stream, x.device)
    guess = sample_counts(model, x, sigma, n0, stream, batch_size=batch_size).cpu().argmax(1)

    def draw(active, m):
        counts = sample_counts(model, x[active.to(x.device)], sigma, m, stream, batch_size=batch_size).cpu()
        return counts.gather(1, guess[active, None]).squeeze(1)

    pred, radii, drawn = sequential_from_votes(draw, guess, sigma, alpha, n_max=n_max, radius=radius,
                                               tolerance=tolerance, first_look=first_look)
    return pred, radii, drawn + n0


def predict(model, x, sigma, n, alpha, *, batch_size=1000, stream=None):
    """The smoothed prediction of each input of x (B, ...): a class or ABSTAIN."""
    _check_alpha(alpha)
    stream = _stream(stream, x.device)
    return predict_from_counts(sample_counts(model, x, sigma, n, stream, batch_size=batch_size), alpha)


def certify(model, x, sigma, n0, n, alpha, *, batch_size=1000, stream=None):
    """(prediction, certified L2 radius) of each input of x (B, ...); ABSTAIN and 0 where the
    bound on pA is below 0.5. The n0 selection samples and the n estimation samples are disjoint
    draws of the stream."""
    _check_int(n0, "n0")
    _check_int(n, "n")
    _check_alpha(alpha)
    check_scale_value(sigma, "sigma")
    stream = _stream(stream, x.device)
    counts0 = sample_counts(model, x, sigma, n0, stream, batch_size=batch_size)
    counts = sample_counts(model, x, sigma, n, stream, batch_size=batch_size)
    return certify_from_counts(counts0, counts, sigma, alpha, n=n)


METHODS = ("cohen", "sequential")


def _certifier(method, sigma, n0, n, alpha, batch_size, radius, tolerance):
    """certify_dataset's per-batch call: (model, x, stream) -> (prediction, radius, samples)."""
    if method not in METHODS:
        raise ValueError(f"method must be 'cohen' or 'sequential', got {method!r}")
    _check_int(n0, "n0")
    _check_int(n, "n")
    if method == "cohen":
        if radius is not None or tolerance is not None:
            raise ValueError("radius and tolerance apply to method='sequential' only")

        def cohen(model, x, stream):
            pred, radii = certify(model, x, sigma, n0, n, alpha, batch_size=batch_size, stream=stream)
            return pred, radii, torch.full_like(pred, n0 + n)
        return cohen
    _check_sequential(alpha, sigma, n, radius, tolerance, 1)
    return lambda model, x, stream: certify_sequential(model, x, sigma, alpha, n_max=n, radius=radius,
                                                       tolerance=tolerance, n0=n0, batch_size=batch_size, stream=stream)


def certify_dataset(model, x, y, sigma, n0, n, alpha, *, method="cohen", radius=None, tolerance=None,
                    inputs_per_batch=1, batch_size=1000, seed=0, rank=None, world=None, progress=False):
    """certify (method="cohen": n estimation samples) or certify_sequential (method="sequential": at
    most n, with its radius and tolerance, default TOLERANCE) over this rank's batches of (x, y):
    per-example index, label, prediction, radius, correct (prediction == label) and samples (the
    n0 + estimation samples each drew). Each batch draws from streams derived from (seed, batch
    index), so gather() of any number of ranks equals one process with the same arguments.
    progress: a progress bar (on a terminal only)."""
    from .evaluate import progress_bar
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must have x's batch size {x.shape[0]}, got shape {tuple(y.shape)}")
    run = _certifier(method, sigma, n0, n, alpha, batch_size, radius, tolerance)
    rows = {"index": [], "label": [], "prediction": [], "radius": [], "samples": []}
    batches = distributed.shard(x.shape[0], _check_int(inputs_per_batch, "inputs_per_batch"), rank, world)
    with progress_bar(len(batches), "certify", progress) as bar:
        for b, start, stop in batches:
            with distributed.reseeded(model, seed, b):
                stream = Stream(distributed.batch_seed(seed, b)).to(x.device)
                pred, radii, samples = run(model, x[start:stop], stream)
            rows["index"].append(torch.arange(start, stop))
            rows["label"].append(y[start:stop].cpu())
            rows["prediction"].append(pred)
            rows["radius"].append(radii)
            rows["samples"].append(samples)
            bar.update(1)
    if not rows["index"]:
        out = {"index": torch.zeros(0, dtype=torch.long), "label": y[:0].cpu(), "prediction": torch.zeros(0, dtype=torch.long),
               "radius": torch.zeros(0, dtype=torch.float64), "samples": torch.zeros(0, dtype=torch.long)}
    else:
        out = {k: torch.cat(v) for k, v in rows.items()}
    out["correct"] = out["prediction"] == out["label"]
    return out


def certified_accuracy(results, radii):
    """For each r of radii, the metrics.Proportion of examples certified correct with radius >= r."""
    ok = results["correct"]
    return [Proportion(int((ok & (results["radius"] >= r)).sum()), len(ok)) for r in radii]


def plot_certified_accuracy(results, path, *, radius=None, max_radius=None, points=100, label=None,
                            title="certified accuracy against L2 radius", settings=None):
    """Saves the certified-accuracy-against-radius curve (Cohen et al.'s figure) to path: exact
    steps at the examples' radii, down to 0 past the largest, with the 95% Clopper-Pearson band;
    titled with the settings (a dict or a string). radius: the results answer that one radius (a run of
    certify_sequential's radius=r), so the plot is its one point with its interval: a curve would
    misstate, below r counting only the inputs certified at r (one given up on may hold a smaller
    radius) and above r falling to 0 where nothing was asked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import titled

    radius = _check_radius(radius)
    fig, ax = plt.subplots(figsize=(6, 4))
    if radius is None:
        radii, accuracy = _curve(results, max_radius, points)
        # a value at r holds on (previous r, r]: the accuracy counts the radii >= r
        ax.plot(radii, accuracy, drawstyle="steps-pre", label=label)
        low, high = zip(*(a.interval() for a in accuracy))
        ax.fill_between(radii, low, high, step="pre", alpha=0.2, linewidth=0, label="95% Clopper-Pearson")
        right = radii[-1]
    else:
        (accuracy,) = certified_accuracy(results, [radius])
        low, high = accuracy.interval()
        ax.errorbar([radius], [accuracy], yerr=[[accuracy - low], [high - accuracy]], fmt="o", capsize=4,
                    label=f"{label or 'certified accuracy'} at r = {radius:g}, 95% Clopper-Pearson")
        right = max(1.1 * max(radius, max_radius or 0.0), 0.1)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, right)
    ax.grid(alpha=0.3)
    titled(ax, title, settings)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title, "Description": str(settings or "")})
    plt.close(fig)
    return path


def _curve(results, max_radius, points):
    """(radii, certified accuracy at each) of the curve: a grid up to past the largest radius (or max_radius)
    and the examples' radii, where the steps are."""
    radius = results["radius"].double()
    top = float(radius.max()) if max_radius is None and len(radius) else float(max_radius or 0.0)
    grid = np.linspace(0.0, max(1.1 * top, 0.1), points)
    radii = np.unique(np.concatenate([grid, radius[(radius > 0) & (radius <= grid[-1])].numpy()]))
    return radii, certified_accuracy(results, radii)


def plot_samples(results, path, *, label=None, title="noisy samples per input", settings=None):
    """Saves the histogram of results["samples"] (the noisy copies each input used) to path, on a
    log scale: sequential certification spends few on clear inputs and up to its n_max on the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import titled

    samples = results["samples"].double().numpy()
    low, high = (samples.min(), samples.max()) if len(samples) else (1.0, 1.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(samples, bins=np.geomspace(low, high * 1.001 if high > low else low * 1.1, 30), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("noisy samples (selection included)")
    ax.set_ylabel("inputs")
    ax.grid(alpha=0.3)
    titled(ax, f"{title}, mean {samples.mean():.0f}" if len(samples) else title, settings)
    if label:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title, "Description": str(settings or "")})
    plt.close(fig)
    return path


__all__ = ["ABSTAIN", "METHODS", "TOLERANCE", "certified_accuracy", "certify", "certify_dataset", "certify_from_counts",
           "certify_sequential", "look_schedule", "lower_confidence_bound", "plot_certified_accuracy", "plot_samples",
           "predict", "predict_from_counts", "sample_counts", "sequential_from_votes", "upper_confidence_bound"]
