"""Robustness metrics of the papers in shared/papers, judged like the papers judge stochastic
defenses: by a single noisy pass, the MC mean ("MC Avg") or the vote ("Voting").

Accuracies are Proportions: floats equal to count / total computed in Python from the integer
counts (no float32 rounding), which also carry the counts and their Clopper-Pearson interval.
A prediction is NO_CLASS (-1) wherever the scores it is taken from say nothing: a pass whose logits
are all NaN, an MC mean holding a NaN, a vote in which no replica voted (every replica all NaN)."""

import math

import torch
from scipy import stats as _stats

from . import ensemble
from .ensemble import NO_CLASS, decide
from .ops.replica_reduce import replica_reduce as _replica_reduce
from .attacks import FGSM as _FGSM, PGD as _PGD
from .random import normal as _normal, uniform as _uniform
from .stream import Stream as _Stream

MODES = ("single", "mean", "vote")
__all__ = ["MODES", "L2_BUCKETS", "NO_CLASS", "Proportion", "accuracy", "decide", "vote_counts", "empirical_robustness", "l2_distortion", "loss_sensitivity",
           "obfuscation_report", "prediction_stability", "predict", "robust_accuracy"]


class Proportion(float):
    """count / total as a float (nan for total 0), with the counts behind it: .count, .total,
    .interval() and .as_dict() for reports."""

    def __new__(cls, count, total):
        count, total = int(count), int(total)
        if not 0 <= count <= total:
            raise ValueError(f"a proportion needs 0 <= count <= total, got {count} of {total}")
        value = super().__new__(cls, count / total if total else math.nan)
        value.count, value.total = count, total
        return value

    def interval(self, confidence=0.95):
        """The two-sided Clopper-Pearson (exact binomial) interval, (nan, nan) for total 0."""
        if not self.total:
            return (math.nan, math.nan)
        ci = _stats.binomtest(self.count, self.total).proportion_ci(confidence_level=confidence, method="exact")
        return (float(ci.low), float(ci.high))

    def as_dict(self):
        """{count, total, fraction, ci95}: what a results file keeps of it."""
        return {"count": self.count, "total": self.total, "fraction": float(self), "ci95": list(self.interval())}

    def __reduce__(self):
        return Proportion, (self.count, self.total)


def _fraction(mask):
    """The fraction of True in a bool tensor as an exact ratio of counts (no float32 noise)."""
    return Proportion(int(mask.sum()), mask.numel())


def vote_counts(logits):
    """(n, B, C) logits -> (B, C) int64 votes of the replicas (ties to the smaller index, NaN
    logits never winning); a replica whose logits are all NaN votes for no class."""
    return _replica_reduce(logits, "vote").long()


@torch.no_grad()
def predict(model, x, *, mode="mean", n=10):
    """Predicted classes: one pass ("single"), or argmax of the MC mean / vote over n passes;
    NO_CLASS where they say nothing (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "single":
        return decide(model(x))
    if mode == "vote":
        return decide(vote_counts(ensemble.mc_predict(model, x, n, reduce="none")), votes=True)
    return decide(ensemble.mc_predict(model, x, n, reduce="mean"))


def accuracy(model, x, y, *, mode="mean", n=10):
    """Clean accuracy: a Proportion (a float in [0, 1] holding the counts)."""
    return _fraction(predict(model, x, mode=mode, n=n) == y)


def robust_accuracy(model, x, y, attack_for_eps, eps_list, *, mode="mean", n=10):
    """{eps: accuracy on attack_for_eps(eps)(x, y)} for each eps."""
    return {eps: accuracy(model, attack_for_eps(eps)(x, y), y, mode=mode, n=n) for eps in eps_list}


L2_BUCKETS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, math.inf)


def l2_distortion(x, x_adv, success, edges=L2_BUCKETS):
    """Counts of the successful examples' L2 distortion in [edges[i], edges[i+1])."""
    l2 = (x_adv - x).flatten(1).norm(dim=1)[success]
    return {(lo, hi): int(((l2 >= lo) & (l2 < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])}


def empirical_robustness(x, x_adv, success):
    """rho = E[|x_adv - x| / |x|] over successful examples (efficient-defenses paper eq. 2)."""
    if not success.any():
        return math.nan
    ratio = (x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    return ratio[success].double().mean().item()


def loss_sensitivity(model, x, y, *, n=1):
    """Mean L2 norm of the (EOT over n draws) input gradient of the per-input cross-entropy."""
    # Each input's loss depends on that input only, so the batch-summed loss (the row mean times B,
    # eot_grad averaging over rows) has the per-input gradients.
    grad, _ = ensemble.eot_grad(model, lambda logits, t: torch.nn.functional.cross_entropy(logits, t) * x.shape[0], x, y, n)
    return grad.flatten(1).norm(dim=1).double().mean().item()


def prediction_stability(model, x, l2, *, trials=10, mode="mean", n=10, seed=0):
    """Fraction of (input, trial) whose prediction under Gaussian noise scaled to L2 norm `l2`
    equals the clean prediction (random-spiking.txt 5.3.1)."""
    stream = _Stream(seed).to(x.device)
    clean = predict(model, x, mode=mode, n=n)
    same = []
    for _ in range(trials):
        z = _normal(x.shape, stream=stream, dtype=x.dtype)
        z = z / z.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1))) * l2
        same.append(predict(model, x + z, mode=mode, n=n) == clean)
    return _fraction(torch.stack(same))


def _success_rate(model, y, x_adv, mode, n):
    return _fraction(predict(model, x_adv, mode=mode, n=n) != y)


def obfuscation_report(model, x, y, eps_list, *, surrogate=None, steps=10, eot=1, mode="mean", n=10, seed=0):
    """The gradient-obfuscation checks of a2snn-anisotropic-noise.txt 4.5, as {check: (passed, detail)}:
    iterative beats one-step; white-box beats transfer (needs a surrogate); an unbounded attack
    reaches 100% success; random sampling in the ball does not beat gradients; larger eps never
    helps the defender."""
    lo_eps = min(eps_list)
    kwargs = dict(eot=eot, judge_n=n, judge="vote" if mode == "vote" else "mean")
    pgd = {eps: _success_rate(model, y, _PGD(model, eps=eps, alpha=eps / 4, steps=steps, seed=seed, **kwargs)(x, y), mode, n)
           for eps in eps_list}
    fgsm = _success_rate(model, y, _FGSM(model, eps=lo_eps, seed=seed, **kwargs)(x, y), mode, n)
    report = {"iterative beats one-step": (pgd[lo_eps] >= fgsm, {"pgd": pgd[lo_eps], "fgsm": fgsm})}
    if surrogate is not None:
        transfer = _success_rate(model, y, _PGD(surrogate, eps=lo_eps, alpha=lo_eps / 4, steps=steps, seed=seed)(x, y), mode, n)
        report["white-box beats transfer"] = (pgd[lo_eps] >= transfer, {"white": pgd[lo_eps], "transfer": transfer})
    unbounded = _success_rate(model, y, _PGD(model, eps=1.0, alpha=0.1, steps=max(steps, 20), seed=seed, **kwargs)(x, y), mode, n)
    report["unbounded attack reaches 100%"] = (unbounded == 1.0, {"success": unbounded})
    stream = _Stream(seed).to(x.device)
    noise = (_uniform(x.shape, stream=stream, dtype=x.dtype) * 2 - 1) * lo_eps
    random = _success_rate(model, y, (x + noise).clamp(0, 1), mode, n)
    report["random sampling does not beat gradients"] = (random <= pgd[lo_eps], {"random": random, "pgd": pgd[lo_eps]})
    rates = [pgd[e] for e in sorted(eps_list)]
    report["larger eps never helps the defender"] = (all(a <= b for a, b in zip(rates, rates[1:])), dict(zip(sorted(eps_list), rates)))
    return report
