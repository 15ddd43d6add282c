"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019; locuslab/smoothing) on the engine.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) of a base classifier f.
predict: counts of n noisy samples; the top class unless a two-sided binomial test of its count
against the runner-up's (p = 0.5) has a p-value above alpha, in which case it abstains.
certify: the top class of n0 samples is the guess cA; n new samples give pA's one-sided
(1 - alpha) Clopper-Pearson lower bound; below 0.5 it abstains, else the certified L2 radius is
sigma * Phi^-1(pA). Noise is never clipped (smoothing does not clip).

Each chunk of samples is one fused pass: noise_add writes m noisy replicas of the B inputs
(replica-major) from the stream, the base classifier runs once on the m*B rows, and replica_reduce
counts the votes on the device; only the final (B, C) counts reach the host for the tests.
"""

import math

import numpy as np
import torch
from scipy import stats

from . import distributed, ensemble
from .functional import noise_add
from .ops.noise_add import check_scale_value
from .ops.replica_reduce import replica_reduce
from .replicas import replicas
from .stream import Stream

ABSTAIN = -1


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
    per input. batch_size: noisy rows per pass (m = batch_size // B replicas, at least 1)."""
    sigma = check_scale_value(sigma, "sigma")
    _check_int(n, "n")
    _check_int(batch_size, "batch_size")
    ensemble._check_batch_statistics(model)
    per_pass = max(1, batch_size // x.shape[0])
    counts = None
    for start in range(0, n, per_pass):
        m = min(per_pass, n - start)
        noisy = noise_add(x, sigma, *stream.reserve(x.numel() * m), replicas=m)
        with replicas(m):
            logits = model(noisy)
        votes = replica_reduce(logits.reshape(m, x.shape[0], -1), "vote").long()
        counts = votes if counts is None else counts + votes
    return counts


def predict_from_counts(counts, alpha):
    """Cohen et al.'s PREDICT from (B, C) counts: the top class, or ABSTAIN."""
    alpha = _check_alpha(alpha)
    c = counts.cpu()
    top2 = c.topk(2, dim=1)
    out = []
    for (n1, n2), (c1, _) in zip(top2.values.tolist(), top2.indices.tolist()):
        out.append(ABSTAIN if stats.binomtest(n1, n1 + n2, 0.5).pvalue > alpha else c1)
    return torch.tensor(out, dtype=torch.long)


def lower_confidence_bound(n_a, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on pA from n_a successes in n."""
    n_a = np.asarray(n_a, dtype=np.float64)
    bound = stats.beta.ppf(alpha, n_a, n - n_a + 1)
    return np.where(n_a == 0, 0.0, bound)


def certify_from_counts(counts0, counts, sigma, alpha):
    """Cohen et al.'s CERTIFY from the selection counts (n0 samples) and the estimation counts (n):
    (prediction, radius), the prediction ABSTAIN with radius 0 where pA's bound is below 0.5."""
    alpha = _check_alpha(alpha)
    guess = counts0.cpu().argmax(1)
    c = counts.cpu()
    n = int(c[0].sum())
    p_a = lower_confidence_bound(c.gather(1, guess[:, None]).squeeze(1).numpy(), n, alpha)
    certified = p_a >= 0.5
    radius = np.where(certified, sigma * stats.norm.ppf(np.clip(p_a, 0.5, None)), 0.0)
    pred = torch.where(torch.from_numpy(certified), guess, torch.full_like(guess, ABSTAIN))
    return pred, torch.from_numpy(radius)


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
    return certify_from_counts(counts0, counts, sigma, alpha)


def certify_dataset(model, x, y, sigma, n0, n, alpha, *, inputs_per_batch=1, batch_size=1000, seed=0,
                    rank=None, world=None):
    """certify over this rank's batches of (x, y): per-example index, label, prediction, radius and
    correct (prediction == label). Each batch draws from streams derived from (seed, batch
    index), so gather() of any number of ranks equals one process with the same arguments."""
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must have x's batch size {x.shape[0]}, got shape {tuple(y.shape)}")
    rows = {"index": [], "label": [], "prediction": [], "radius": []}
    for b, start, stop in distributed.shard(x.shape[0], _check_int(inputs_per_batch, "inputs_per_batch"), rank, world):
        with distributed.reseeded(model, seed, b):
            stream = Stream(distributed.batch_seed(seed, b)).to(x.device)
            pred, radius = certify(model, x[start:stop], sigma, n0, n, alpha, batch_size=batch_size, stream=stream)
        rows["index"].append(torch.arange(start, stop))
        rows["label"].append(y[start:stop].cpu())
        rows["prediction"].append(pred)
        rows["radius"].append(radius)
    if not rows["index"]:
        return {"index": torch.zeros(0, dtype=torch.long), "label": y[:0].cpu(), "prediction": torch.zeros(0, dtype=torch.long),
                "radius": torch.zeros(0, dtype=torch.float64), "correct": torch.zeros(0, dtype=torch.bool)}
    out = {k: torch.cat(v) for k, v in rows.items()}
    out["correct"] = out["prediction"] == out["label"]
    return out


def certified_accuracy(results, radii):
    """For each r of radii, the fraction of examples certified correct with radius >= r."""
    ok = results["correct"]
    return [float((ok & (results["radius"] >= r)).double().mean()) if len(ok) else math.nan for r in radii]


def plot_certified_accuracy(results, path, *, max_radius=None, points=100, label=None):
    """Saves the certified-accuracy-against-radius curve (Cohen et al.'s figure) to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = float(results["radius"].max()) if max_radius is None else float(max_radius)
    radii = np.linspace(0.0, max(top, 1e-3), points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(radii, certified_accuracy(results, radii), label=label)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    if label is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["ABSTAIN", "certified_accuracy", "certify", "certify_dataset", "certify_from_counts", "lower_confidence_bound",
           "plot_certified_accuracy", "predict", "predict_from_counts", "sample_counts"]
