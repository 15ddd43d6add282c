"""AutoAttack (Croce & Hein 2020, fra31/auto-attack) on the batched engine.

version="rand" (randomized defenses): APGD-CE, then APGD-DLR on the points still robust, each with
EOT 20 and one restart. version="standard" (deterministic models): APGD-CE, APGD-T (targeted DLR,
9 target classes), FAB-T (9 target classes, its example counted only within eps) and Square (5000
queries), auto-attack's four, each with one restart. Square is L-inf only here, so "standard" is
L-inf only (auto-attack also runs it at L2, with an L2 Square this library does not have).
Every stage runs on the points the previous ones left robust, as auto-attack does; a point is
robust while the MC prediction on noise independent of the attack's draws still classifies it
correctly ("rand" needs judge_n >= 2: never a single draw). attack.log holds each stage's robust
accuracy and cumulative time, as auto-attack prints them. Those running figures come from one
noisy judgement per stage, and a point gets a chance to be judged fooled at every stage, so the
reported result (attack.success, attack.robust_accuracy, the log's "final" line) is the base's
last MC judgement of the returned examples on fresh noise, except that an input no stage attacked
(each judged x fooled first) counts fooled: a fresh judgement of x must not count it robust. The
example returned for an input no stage fooled is the last stage's (its highest-loss point), not x:
on a noisy model the final judgement of x would pass it almost surely and rate the defense above
its own first stage alone.
"""

import time

import torch

from .apgd import APGD, _per_sample
from .base import Attack, _check_nonnegative, _check_positive_int
from .fab import FAB
from .square import Square

VERSIONS = ("rand", "standard")


class AutoAttack(Attack):
    """AutoAttack(model, eps=8/255, norm="Linf", version="rand", steps=100)(x, y).

    steps: APGD iterations per stage, 100 as in auto-attack (Croce & Hein 2020) for both versions.
    torchattacks' AutoAttack(version='rand') runs its APGDs with 10 steps: pass steps=10 here (or
    steps=100 there) when comparing the two.
    eot: draws per gradient of the "rand" APGDs (default 20). queries: Square's budget and
    n_targets: the target classes of APGD-T and FAB-T (default 9), both "standard" only; FAB-T runs
    `steps` iterations as well. verbose: print each stage's line.
    """

    def __init__(self, model, eps=8 / 255, norm="Linf", version="rand", steps=100, queries=None, n_targets=None,
                 verbose=False, eot=None, **kwargs):
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if kwargs.get("targeted"):
            raise ValueError("AutoAttack is untargeted: targeted=True is not accepted")
        rand = version == "rand"
        super().__init__(model, eot=(20 if rand else 1) if eot is None else eot, **kwargs)
        if rand and (queries is not None or n_targets is not None):
            raise ValueError("queries and n_targets belong to version='standard' (Square and APGD-T)")
        if rand and self.judge_n < 2:
            raise ValueError(f"version='rand' judges by an MC prediction: judge_n must be >= 2, got {self.judge_n}")
        self.version, self.norm, self.verbose = version, norm, bool(verbose)
        self.eps = _check_nonnegative(eps, "eps")
        self.steps = _check_positive_int(steps, "steps")
        common = dict(eps=eps, eot=self.eot, judge_n=self.judge_n, judge=self.judge, clip=self.clip, seed=0)
        if rand:
            stages = [("apgd-ce", APGD(model, norm=norm, steps=steps, loss="ce", **common)),
                      ("apgd-dlr", APGD(model, norm=norm, steps=steps, loss="dlr", **common))]
        else:
            if norm != "Linf":
                raise ValueError(f"version='standard' runs Square, which is L-inf only in this library (no L2 Square): "
                                 f"norm must be 'Linf', got {norm!r}")
            n_targets = 9 if n_targets is None else n_targets
            stages = [("apgd-ce", APGD(model, norm=norm, steps=steps, loss="ce", **common)),
                      ("apgd-t", APGD(model, norm=norm, steps=steps, loss="dlr-targeted", n_targets=n_targets, **common)),
                      ("fab-t", FAB(model, norm=norm, steps=steps, n_targets=n_targets, **common)),
                      ("square", Square(model, queries=5000 if queries is None else queries, **common))]
        for i, (_, attack) in enumerate(stages):
            attack.stream = self.stream.fork(i)  # the stages' streams come from this attack's seed
        self.stages = stages
        self.log, self.robust_accuracy, self._start = [], None, None

    def class_needs(self):
        return [(needed, f"AutoAttack's {name} stage: {what}") for name, attack in self.stages
                for needed, what in attack.class_needs()]

    def _note(self, name, robust, start):
        entry = {"attack": name, "robust_accuracy": robust.float().mean().item(), "seconds": time.perf_counter() - start}
        self.log.append(entry)
        if self.verbose:
            label = {"clean": "initial accuracy", "final": "robust accuracy (MC on fresh noise)"}.get(
            name, f"robust accuracy after {name.upper()}")
            print(f"{label}: {entry['robust_accuracy']:.2%} (total time {entry['seconds']:.1f} s)")

    def forward(self, x, y):
        self._start = start = time.perf_counter()
        self.log = []
        robust = ~self.succeeded(x, y)
        self._note("clean", robust, start)
        x_adv, attacked = x.clone(), torch.zeros_like(robust)
        for name, attack in self.stages:
            idx = robust.nonzero().squeeze(1)
            if idx.numel() > 0:
                found = attack(x[idx], y[idx])
                fooled = attack.success
                skipped = torch.zeros_like(fooled) if attack.clean_fooled is None else attack.clean_fooled
                # Every point the stage attacked takes its example, those it leaves robust too (judged on
                # x instead, a noisy model's final judgement would pass them almost surely); one it
                # skipped (x judged fooled) keeps an earlier stage's.
                x_adv[idx] = torch.where(_per_sample(skipped, found), x_adv[idx], found)
                robust[idx[fooled]] = False
                attacked[idx] |= ~skipped
            self._note(name, robust, start)
        # No stage attacked these (each judged x fooled before attacking): counted fooled (judge_success),
        # or the final judgement of x on fresh noise could count an input never attacked robust.
        self.clean_fooled = ~attacked
        return x_adv

    def judge_success(self, x_adv, y):
        success = super().judge_success(x_adv, y)
        self._note("final", ~success, self._start)
        self.robust_accuracy = self.log[-1]["robust_accuracy"]
        return success
