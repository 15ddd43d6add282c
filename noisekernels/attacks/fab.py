"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020; fra31/auto-attack's fab_pt.py),
L-inf and L2, with EOT class-difference gradients from the batched engine.

A minimal-norm attack: each step linearizes the class-difference functions g_j = f_j - f_y at the
current point, picks the closest linearized boundary, projects both the current point and the
original input onto it (within the input range), and moves to a mix of the two projections biased
toward the original (weight alpha <= alpha_max on the original's projection, overshoot eta). A
point found adversarial is kept if it is the closest so far, and the iterate goes back toward the
input by a factor beta. FAB-T (n_targets: AutoAttack's 'standard' version) uses the single
difference f_t - f_y toward each of the n_targets most likely classes other than y in turn.

With eot > 1, each class difference and its gradient are means over eot noise draws of that
difference (the same draws for f_j and f_y), all differences of a batch in one engine call; inside
a run a point counts as adversarial when the mean prediction of eot fresh draws says so. Between
runs (restarts, targets) the attack's MC prediction decides which points are still robust; what
the attack returns is judged by the base's MC prediction on noise none of these saw.
"""

import torch

from .. import ensemble
from ..random import normal, uniform
from .apgd import _per_sample
from .base import Attack, _check_nonnegative, _check_positive_int, likely_targets

NORMS = ("Linf", "L2")
_TINY = 1e-12


def _norm(d, norm):
    flat = d.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.square().sum(1).sqrt()


def _level(v, r, c):
    """The lambda >= 0 solving sum_i v_i min(lambda, r_i) = c per row (v, r >= 0: a piecewise-linear,
    nondecreasing function of lambda); inf where even lambda = max r falls short."""
    r, order = r.sort(1)
    v = v.gather(1, order)
    done, used = (v * r).cumsum(1), v.cumsum(1)  # after the k smallest r saturate
    reached = done + r * (used[:, -1:] - used)  # the function's value at lambda = r_k
    k = (reached < c[:, None]).sum(1, keepdim=True)  # breakpoints below the solution
    pad = torch.zeros_like(c)[:, None]
    total = used[:, -1:]
    done, used = torch.cat([pad, done], 1).gather(1, k), torch.cat([pad, used], 1).gather(1, k)
    lam = (c[:, None] - done) / (total - used)
    return torch.where(k == r.shape[1], torch.inf, lam).squeeze(1)


def project(x, w, b, norm, clip):
    """The smallest (L-inf or L2) step d with w . (x + d) = b and x + d within clip, per row of the
    (B, D) points x; where the hyperplane is out of reach inside the box, the step to the box corner
    closest to it. The problem of auto-attack's projection_linf / projection_l2 (box [0, 1] there),
    solved as a water level: each coordinate moves toward the hyperplane until its bound."""
    lo, hi = clip
    gap = (w * x).sum(1) - b
    w, excess = w * torch.where(gap >= 0, 1, -1).to(w.dtype)[:, None], gap.abs()  # now: lower w . x by excess
    room = torch.where(w > 0, x - lo, hi - x)  # how far each coordinate can move in its useful direction
    if norm == "Linf":
        live = w != 0
        weight, reach = w.abs(), room
    else:
        live = w.abs() > 1e-8  # auto-attack's threshold: smaller weights make room / |w| blow up
        weight, reach = w.square(), room / w.abs().clamp_min(1e-8)
    weight, reach = torch.where(live, weight, 0), torch.where(live, reach, 0)
    lam = _level(weight, reach, excess)[:, None]
    move = torch.minimum(lam, reach)
    d = -(w.sign() if norm == "Linf" else w) * move
    return torch.where(live, d, 0)


class FAB(Attack):
    """FAB(model, norm="Linf", eps=8/255, steps=100, restarts=1, eot=1, seed=None)(x, y).

    alpha_max, eta, beta: the paper's bias toward the input, overshoot and backward step
    (auto-attack's 0.1, 1.05, 0.9). n_targets: None for FAB, an int for FAB-T over the n_targets
    classes other than y most likely under the clean MC prediction (success is then any
    misclassification, as in auto-attack). targeted=True (y holds targets): each step crosses the
    boundary between the target and the class whose linearized boundary is farthest on the wrong
    side. The first restart starts at x, later ones at a random point at distance eps / 2
    from x (on the sphere, not inside the ball: auto-attack's start).

    A minimal-norm attack: attack.norms holds, per input, the norm of the smallest adversarial
    perturbation found (0 where x itself is not robust, inf where none was found); the returned
    example is that one where its norm is <= eps and x otherwise (auto-attack's rule). Restarts and
    targets run on the points not yet fooled within eps (on a noisy model, also those whose example
    the MC judgement found not to fool: a later run's example within eps then replaces it, and its
    norm the recorded one).
    """

    def __init__(self, model, norm="Linf", eps=8 / 255, steps=100, restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                 n_targets=None, **kwargs):
        super().__init__(model, **kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.eps = _check_nonnegative(eps, "eps")
        self.steps = _check_positive_int(steps, "steps")
        self.restarts = _check_positive_int(restarts, "restarts")
        self.alpha_max = _check_nonnegative(alpha_max, "alpha_max")
        if self.alpha_max > 1:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max!r}")
        self.eta = _check_nonnegative(eta, "eta")
        if self.eta < 1:
            raise ValueError(f"eta (the overshoot) must be >= 1, got {eta!r}")
        self.beta = _check_nonnegative(beta, "beta")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        if n_targets is not None:
            _check_positive_int(n_targets, "n_targets")
            if self.targeted:
                raise ValueError("n_targets (FAB-T picks its own targets) cannot be combined with targeted=True")
        self.n_targets = n_targets
        self.norms = None

    def class_needs(self):
        return [] if self.n_targets is None else [(self.n_targets + 1, f"n_targets={self.n_targets}")]

    def differences(self, x, own, others):
        """Per row and column k: the mean over self.eot draws of f_{others[:, k]} - f_own at x, (B, K),
        and its gradient, (B, K, ...): one engine call over the K copies of x."""
        b, k = others.shape
        stats = {"diff": x.new_zeros(k * b), "draws": 0}

        def loss_fn(logits, labels):  # called once per draw, on that draw's (K*B, C) logits
            diff = (logits.gather(1, labels[:, 1:]) - logits.gather(1, labels[:, :1])).squeeze(1)
            stats["diff"] += diff.detach()
            stats["draws"] += 1
            return diff.sum()  # the engine averages over draws: the gradient of each row's mean difference

        labels = torch.stack([own.repeat(k), others.T.reshape(-1)], 1)  # copy-major, as x.repeat
        grad, _ = ensemble.eot_grad(self.model, loss_fn, x.repeat(k, *([1] * (x.dim() - 1))), labels, self.eot)
        diff = (stats["diff"] / stats["draws"]).view(k, b).T
        return diff, grad.view(k, b, *x.shape[1:]).transpose(0, 1)

    def _boundary(self, x1, y, others):
        """The linearized boundary to cross, among f_j = f_y for j in others: (difference at x1, its
        gradient), per row. Untargeted (and FAB-T, one column): the closest. Targeted (y is the
        target): the class most on the wrong side of it (largest signed distance of f_j - f_t)."""
        df, dg = self.differences(x1, y, others)
        dual = dg.flatten(2).abs().sum(2) if self.norm == "Linf" else dg.flatten(2).square().sum(2).sqrt()
        distance = df / (dual + _TINY)
        pick = distance.argmax(1) if self.targeted else distance.abs().argmin(1)
        rows = torch.arange(x1.shape[0], device=x1.device)
        return df[rows, pick], dg[rows, pick]

    def _adversarial(self, x1, y):
        """Whether the mean prediction of self.eot fresh draws at x1 misses y (hits the target)."""
        pred = ensemble.decide(ensemble.mc_predict(self.model, x1, self.eot))
        return pred == y if self.targeted else pred != y

    def _start(self, x):
        if self.norm == "Linf":
            t = uniform(x.shape, stream=self.stream, dtype=x.dtype).to(x.device) * 2 - 1
        else:
            t = normal(x.shape, stream=self.stream, dtype=x.dtype).to(x.device)
        return self.project_to_range(x + 0.5 * self.eps * t / _per_sample(_norm(t, self.norm) + _TINY, x))

    def run_once(self, x, y, others, random_start=False):
        """One FAB run across the boundaries f_j = f_y, j in others (B, K): per input, the smallest
        adversarial perturbation's norm (inf: none found) and that adversarial point (x where none)."""
        b = x.shape[0]
        x0 = x.flatten(1)
        x1 = self._start(x) if random_start else x.clone()
        best_norm, best = x.new_full((b,), torch.inf), x.clone()
        for _ in range(self.steps):
            df, dg = self._boundary(x1, y, others)
            with torch.no_grad():
                w = dg.flatten(1)
                plane = (w * x1.flatten(1)).sum(1) - df  # the linearization's zero: w . z = plane
                d = project(torch.cat([x1.flatten(1), x0]), torch.cat([w, w]), torch.cat([plane, plane]),
                            self.norm, self.clip)
                size = _norm(d, self.norm).clamp_min(1e-8)
                alpha = (size[:b] / (size[:b] + size[b:])).clamp(0, self.alpha_max)
                alpha = alpha[:, None]
                mixed = (x1.flatten(1) + self.eta * d[:b]) * (1 - alpha) + (x0 + self.eta * d[b:]) * alpha
                x1 = self.project_to_range(mixed.view_as(x))
                adversarial = self._adversarial(x1, y)
                size = _norm(x1 - x, self.norm)
                closer = adversarial & (size < best_norm)
                best = torch.where(_per_sample(closer, x), x1, best)
                best_norm = torch.where(closer, size, best_norm)
                # From an adversarial point, step back toward the input to search closer to it.
                x1 = torch.where(_per_sample(adversarial, x), x + (x1 - x) * self.beta, x1)
        return best_norm, best

    def forward(self, x, y):
        probs = ensemble.mc_predict(self.model, x, self.judge_n)
        classes = probs.shape[1]
        bad = (y < 0) | (y >= classes)
        if y.dtype != torch.long or bad.any():
            raise ValueError(f"y must hold class indices (int64) in [0, {classes}), got {y.dtype} with "
                             f"{y[bad].unique()[:5].tolist()}")
        if self.n_targets is None:
            every = torch.arange(classes, device=x.device).expand(x.shape[0], classes)
            others = [every[every != y[:, None]].view(-1, classes - 1)]
        else:
            others = likely_targets(probs, y, self.n_targets).split(1, dim=1)  # FAB-T: one target per run
        x_adv = x.clone()
        self.clean_fooled = self.succeeded(x, y)  # not attacked: counted fooled (judge_success)
        robust = ~self.clean_fooled
        self.norms = torch.where(robust, torch.inf, 0.0).to(x.dtype)
        runs = [(columns, r) for columns in others for r in range(self.restarts)]
        for i, (columns, restart) in enumerate(runs):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xs, ys = x[idx], y[idx]
            size, found = self.run_once(xs, ys, columns[idx], random_start=restart > 0)
            # Within eps the run's example replaces the kept one (a kept one here was judged not to
            # fool); beyond eps only the smallest norm is recorded and x stays.
            within = size <= self.eps
            x_adv[idx] = torch.where(_per_sample(within, xs), found, x_adv[idx])
            self.norms[idx] = torch.where(within, size, torch.minimum(size, self.norms[idx]))
            if i + 1 < len(runs):  # which points the next run attacks: MC on noise the run never saw
                robust[idx] = ~(within & self.succeeded(x_adv[idx], ys))
        return x_adv
