"""APGD (Croce & Hein 2020, fra31/auto-attack) with EOT gradients from the batched engine.

The algorithm is auto-attack's: a step of 2 * eps, momentum 0.75, and checkpoints at
w_j = p_j * steps (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) where the
step size halves and the iterate goes back to the best point when fewer than rho of the steps since
the last checkpoint raised the loss, or when the step was not reduced last time and the best loss
did not improve since. Losses: cross-entropy ("ce"), the difference of logits ratio ("dlr"), and the
targeted DLR of APGD-T ("dlr-targeted": each input is attacked toward its most likely classes other
than y in turn). With eot > 1 the gradient and the per-input loss are means over eot noise draws,
all from one batched pass. Inside a run a point counts as adversarial when the mean prediction of
those draws is wrong; between runs (restarts, targets) the attack's MC prediction decides which
points are still robust; what the attack returns is judged by the base's MC prediction on noise
none of these saw (attack.success).
"""

import torch

from .. import ensemble
from ..random import normal, uniform
from .base import Attack, _check_nonnegative, _check_positive_int, likely_targets

NORMS = ("Linf", "L2")
LOSSES = ("ce", "dlr", "dlr-targeted")
_TINY = 1e-12


def dlr_loss(logits, y):
    """Per-row DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) (logits sorted decreasingly)."""
    top, _ = logits.topk(3, dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = torch.where(top[:, 0] == z_y, top[:, 1], top[:, 0])
    return -(z_y - other) / (top[:, 0] - top[:, 2] + _TINY)


def dlr_targeted_loss(logits, y, target):
    """Per-row targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    top, _ = logits.topk(4, dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + _TINY)


def checkpoints(steps):
    """The iterations (0-based) after which APGD checks its step size, as auto-attack counts them."""
    first, minimum, decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    points, k, counter = [], first, 0
    for i in range(steps):
        counter += 1
        if counter == k:
            points.append((i, k))
            counter, k = 0, max(k - decrease, minimum)
    return points


def _per_sample(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


class APGD(Attack):
    """APGD(model, norm="Linf", eps=8/255, steps=100, loss="ce", restarts=1, eot=1, seed=None)(x, y).

    random_start: start each run from a random point of the eps-ball (auto-attack's, the default) or,
    False, from x itself (where eps spans the whole input range a random start is a random input,
    which can succeed without any gradient). rho: the checkpoint's fraction of loss-raising steps. n_targets: target classes of
    "dlr-targeted" (the n_targets most likely classes other than y, as APGD-T). targeted=True (y holds
    targets) is supported with loss="ce". Restarts (and targets) run on the points still robust.
    """

    def __init__(self, model, norm="Linf", eps=8 / 255, steps=100, loss="ce", restarts=1, rho=0.75, n_targets=9,
                 random_start=True, **kwargs):
        super().__init__(model, **kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if self.targeted and loss != "ce":
            raise ValueError(f"targeted=True needs loss='ce' (loss={loss!r} is untargeted; 'dlr-targeted' picks its own targets)")
        self.norm, self.loss_name = norm, loss
        self.eps = _check_nonnegative(eps, "eps")
        self.steps = _check_positive_int(steps, "steps")
        self.restarts = _check_positive_int(restarts, "restarts")
        self.rho = _check_nonnegative(rho, "rho")
        if self.rho > 1:
            raise ValueError(f"rho must be in [0, 1], got {rho!r}")
        self.n_targets = _check_positive_int(n_targets, "n_targets")
        self.random_start = bool(random_start)

    def per_input_loss(self, logits, y, target):
        if self.loss_name == "dlr":
            return dlr_loss(logits, y)
        if self.loss_name == "dlr-targeted":
            return dlr_targeted_loss(logits, y, target)
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        return -ce if self.targeted else ce

    def _eot(self, x_adv, y, target):
        """EOT gradient of the summed per-input loss, the per-input loss and the mean softmax over
        self.eot draws, from one batched pass per chunk."""
        rows = x_adv.shape[0]
        stats = {"loss": x_adv.new_zeros(rows), "probs": 0.0, "draws": 0}

        def loss_fn(logits, labels):  # the engine calls it once per draw, on that draw's (B, C) logits
            indiv = self.per_input_loss(logits, labels[:, 0], labels[:, 1])
            stats["loss"] += indiv.detach()
            stats["probs"] = stats["probs"] + logits.detach().softmax(1)
            stats["draws"] += 1
            return indiv.sum()  # the engine averages over draws: grad of the mean over draws

        labels = torch.stack([y, y if target is None else target], 1)
        grad, _ = ensemble.eot_grad(self.model, loss_fn, x_adv, labels, self.eot)
        return grad, stats["loss"] / stats["draws"], stats["probs"] / stats["draws"]

    def _adversarial(self, probs, y):
        pred = probs.argmax(1)
        return pred == y if self.targeted else pred != y

    def _normalize(self, v):
        flat = v.flatten(1)
        size = flat.abs().amax(1) if self.norm == "Linf" else flat.square().sum(1).sqrt()
        return v / _per_sample(size + _TINY, v)

    def _start(self, x):
        if self.norm == "Linf":
            t = uniform(x.shape, stream=self.stream, dtype=x.dtype).to(x.device) * 2 - 1
        else:
            t = normal(x.shape, stream=self.stream, dtype=x.dtype).to(x.device)
        return self.project_to_range(x + self.eps * self._normalize(t))

    def _project(self, x, v):
        if self.norm == "Linf":
            return self.project_to_range(torch.minimum(torch.maximum(v, x - self.eps), x + self.eps))
        d = v - x
        size = d.flatten(1).square().sum(1).sqrt()
        return self.project_to_range(x + self._normalize(d) * _per_sample(size.clamp(max=self.eps), x))

    def _step(self, x, x_adv, grad, momentum, step_size, a):
        direction = grad.sign() if self.norm == "Linf" else self._normalize(grad)
        z = self._project(x, x_adv + _per_sample(step_size, x) * direction)
        return self._project(x, x_adv + (z - x_adv) * a + momentum * (1 - a))

    def run_once(self, x, y, target=None):
        """One APGD run (from a random start unless random_start=False): (its example, adversarial per
        the EOT draws): the last point found adversarial where there is one, else the highest-loss point."""
        x_adv = self._start(x) if self.random_start else x.clone()
        x_best_adv = x_adv.clone()
        grad, loss, probs = self._eot(x_adv, y, target)
        adversarial = self._adversarial(probs, y)
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        loss_steps = x.new_zeros(self.steps, x.shape[0])
        step_size = torch.full((x.shape[0],), 2 * self.eps, dtype=x.dtype, device=x.device)
        x_old = x_adv.clone()
        check = dict(checkpoints(self.steps))
        loss_best_last = loss_best.clone()
        reduced_last = torch.ones_like(adversarial)
        for i in range(self.steps):
            with torch.no_grad():
                momentum, x_old = x_adv - x_old, x_adv
                x_adv = self._step(x, x_adv, grad, momentum, step_size, 0.75 if i > 0 else 1.0)
            grad, loss, probs = self._eot(x_adv, y, target)
            now = self._adversarial(probs, y)
            x_best_adv = torch.where(_per_sample(now, x), x_adv, x_best_adv)
            adversarial |= now
            loss_steps[i] = loss
            better = loss > loss_best
            x_best = torch.where(_per_sample(better, x), x_adv, x_best)
            grad_best = torch.where(_per_sample(better, x), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            if i in check:
                k = check[i]
                # Raises over the last k steps; like auto-attack, the first window compares step 0
                # with the (still zero) last row, so a positive first loss counts as a raise.
                raises = sum((loss_steps[i - j] > loss_steps[i - j - 1]).to(x.dtype) for j in range(k))
                reduce = (raises <= k * self.rho) | (~reduced_last & (loss_best_last >= loss_best))
                reduced_last, loss_best_last = reduce, loss_best.clone()
                step_size = torch.where(reduce, step_size / 2, step_size)
                x_adv = torch.where(_per_sample(reduce, x), x_best, x_adv)
                grad = torch.where(_per_sample(reduce, x), grad_best, grad)
        return torch.where(_per_sample(adversarial, x), x_best_adv, x_best), adversarial

    def class_needs(self):
        # DLR divides by the gap between the 1st and 3rd logits; its targeted form uses the 4th.
        if self.loss_name == "dlr":
            return [(3, "loss='dlr'")]
        if self.loss_name == "dlr-targeted":
            return [(4, "loss='dlr-targeted'"), (self.n_targets + 1, f"n_targets={self.n_targets}")]
        return []

    def forward(self, x, y):
        x_adv = x.clone()
        self.clean_fooled = self.succeeded(x, y)  # not attacked: counted fooled (judge_success)
        robust = ~self.clean_fooled
        ranks, targets = [None], None
        if self.loss_name == "dlr-targeted":
            targets = likely_targets(ensemble.mc_predict(self.model, x, self.judge_n), y, self.n_targets)
            ranks = range(self.n_targets)
        runs = [(rank, r) for rank in ranks for r in range(self.restarts)]
        for i, (rank, _) in enumerate(runs):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xs, ys = x[idx], y[idx]
            target = None if rank is None else targets[idx, rank]
            found, _ = self.run_once(xs, ys, target)
            x_adv[idx] = found
            if i + 1 < len(runs):  # which points the next run attacks: MC on noise the run never saw
                robust[idx] = ~self.succeeded(found, ys)
        return x_adv
