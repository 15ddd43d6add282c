"""The adaptive-evaluation checklist for randomized defenses, run end to end with confidence
intervals: `report = audit(model, x, y, eps, norm="Linf")`.

The checks are those of Carlini et al. 2019 ("On Evaluating Adversarial Robustness") and of
AutoAttack's checks.py (check_randomized, check_zero_gradients, check_square_sr):
1. randomness, 2. EOT sufficiency, 3. iteration sufficiency, 4. fixed randomness, 5. unbounded
attack, 6. white-box beats black-box, 7. zero gradients, 8. transfer from the noise-free twin,
9. final judgement without random escape. Each is a Check: a verdict (pass / warn / fail), the
numbers behind it and one sentence on what it means and what to do.

Judging: every APGD attack is one run over every input (none left out by the attack's own clean
judgement, whose lucky draw would leave an input unattacked). Every adversarial batch at the budget
eps is judged by `judgements` (>= 3) independent MC predictions of `judge_n` passes each, on noise
no attack saw. An attack's figure (and
`robust_accuracy`) pools them: the argmax of the mean over all judgements * judge_n passes.
`robust_accuracy` counts an input robust when the pooled judgement classifies it correctly clean
and under every attack; `robust_accuracy_worst` only when every single judgement does too (AutoAttack's
per-example worst over attacks, with no lucky draw to escape by), so it is never above the other.
Both are metrics.Proportions with 95% Clopper-Pearson intervals. Checks 2 and 3 compare two attacks on
the same inputs, so they use a paired test (exact McNemar, one-sided: scipy's binomtest on the inputs
only one of the two leaves robust): doubling EOT or the iterations "lowers robust accuracy" when it
does at level LOWERED_ALPHA, far more sensitive than comparing two intervals.

Fixed randomness (check 4): every pass of the model draws the same counters of a sub-stream of each
noise stream, one the model's own passes (the judgements) never reach. Noise is drawn per element of
a batch (ARCHITECTURE.md section 2), so row i of a batch sees one frozen draw at every pass; the check
attacks and judges every input at its own row of the full batch (a batch-wide statistic, such as
Random Spiking's min/max, still follows the batch's contents).

Budget: the defaults (10 APGD steps, EOT doubling up to 16, 100 Square queries, 3 judgements of 20
passes) audit 200 digits in seconds to minutes on a CPU; every argument grows it. Every attack draws
from a stream forked from `seed`, and the model's noise streams are reseeded from it for the audit
(and put back after), as are torch's own generators (nn.Dropout), so an audit is reproducible from its
seed: bit for bit inside ensemble.fixed_chunk(k), else up to the float rounding of the chunk of
replicas the engine measures fastest (which an attack's sign step can amplify).
"""

import contextlib
import dataclasses
import itertools
import math
import os
import time

import torch
from scipy import stats

from . import distributed, ensemble, evaluate
from .attacks import APGD, Square
from .attacks.base import _check_nonnegative, _check_positive_int
from .defenses import NOISE_LAYERS
from .metrics import Proportion
from .replicas import noise_off
from .stream import Sandbox, Stream, derive_seed

VERDICTS = ("pass", "warn", "fail")
NORMS = ("Linf", "L2")
# Check 7: a share of inputs with an all-zero EOT gradient above this fails (any share above 0 warns).
ZERO_GRADIENT_FAIL = 0.1
# Check 5: a share of inputs the unbounded attack leaves robust up to this warns (judging noise near the
# decision boundary, too few steps); above it fails.
UNBOUNDED_FEW = 0.01
# Checks 2 and 3: doubling EOT or the iterations lowers robust accuracy when the paired test's p-value is below this.
LOWERED_ALPHA = 0.05
RANDOMNESS_PASSES = 8  # check 1: passes compared (AutoAttack's check_randomized compares two)
_FROZEN_SUBSTREAM = 2**63  # check 4's frozen draw: this sub-stream of every noise stream


@dataclasses.dataclass
class Check:
    """One check's verdict, the numbers behind it and what it means (and what to do)."""
    name: str
    verdict: str
    numbers: dict
    meaning: str

    def as_dict(self):
        return {"name": self.name, "verdict": self.verdict, "numbers": _plain(self.numbers), "meaning": self.meaning}


def _plain(value):
    """Numbers as JSON values: Proportions as {count, total, fraction, ci95}."""
    if isinstance(value, Proportion):
        return value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _shown(value):
    """A number as the markdown report shows it."""
    if isinstance(value, Proportion):
        lo, hi = value.interval()
        return f"{100 * value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({value.count}/{value.total})"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "none"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass
class Report:
    """What audit() found. checks: the nine Checks in order; clean_accuracy, robust_accuracy and
    robust_accuracy_worst: Proportions (module docstring); attacks: {attack: its pooled robust
    accuracy at eps}; curves: {"eot": {eot: robust accuracy}, "steps": {steps: robust accuracy}} of
    APGD-CE; settings: the arguments; seconds: time per check (the only part a rerun changes)."""
    checks: list
    clean_accuracy: Proportion
    robust_accuracy: Proportion
    robust_accuracy_worst: Proportion
    attacks: dict
    curves: dict
    settings: dict
    seconds: dict

    def to_json(self):
        return {"settings": self.settings, "clean_accuracy": self.clean_accuracy.as_dict(),
                "robust_accuracy": self.robust_accuracy.as_dict(),
                "robust_accuracy_worst": self.robust_accuracy_worst.as_dict(),
                "checks": [c.as_dict() for c in self.checks], "attacks": _plain(self.attacks),
                "curves": _plain(self.curves), "seconds": self.seconds}

    def to_markdown(self, title="Audit", plots=()):
        """The report as a markdown page (plots: image paths, relative to the page, shown at its end)."""
        s = self.settings
        lines = [f"# {title}", "",
                 f"{s['inputs']} inputs, {s['norm']} eps {s['eps']:g}, seed {s['seed']}; APGD {s['steps']} steps, "
                 f"EOT up to {s['eot_cap']}, Square {s['queries']} queries; every example judged {s['judgements']} "
                 f"times by the MC mean of {s['judge_n']} fresh passes. Figures with 95% Clopper-Pearson intervals.", "",
                 "| figure | value |", "|---|---|",
                 f"| clean accuracy | {_shown(self.clean_accuracy)} |",
                 f"| robust accuracy (pooled MC judgement, worst over attacks) | {_shown(self.robust_accuracy)} |",
                 "| robust accuracy, worst case (every judgement, every attack) | "
                 f"{_shown(self.robust_accuracy_worst)} |",
                 "", "| # | check | verdict | numbers | meaning |", "|---|---|---|---|---|"]
        for i, c in enumerate(self.checks, 1):
            numbers = "; ".join(f"{k}: {_shown(v)}" for k, v in c.numbers.items())
            lines.append(f"| {i} | {c.name} | **{c.verdict}** | {numbers} | {c.meaning} |")
        lines += ["", "| attack (at eps) | robust accuracy |", "|---|---|"]
        lines += [f"| {name} | {_shown(p)} |" for name, p in self.attacks.items()]
        lines += [""] + [f"![{os.path.basename(path)}]({path})" for path in plots]
        return "\n".join(lines) + "\n"

    def plot(self, out, prefix="audit"):
        """Robust accuracy against EOT samples and against iterations, with interval bands: the
        paths of the two PNGs written under out."""
        s = self.settings
        settings = {"norm": s["norm"], "eps": s["eps"], "inputs": s["inputs"], "seed": s["seed"],
                    "judged by": f"{s['judgements']} x MC mean of {s['judge_n']} fresh passes"}
        eot = evaluate.plot(os.path.join(out, f"{prefix}_eot.png"), {f"APGD-CE, {s['steps']} steps": self.curves["eot"]},
                            "EOT samples per gradient", "robust accuracy", "Audit: robust accuracy against EOT samples",
                            settings=settings, xlog=True, xticks=sorted(self.curves["eot"]))
        steps = evaluate.plot(os.path.join(out, f"{prefix}_steps.png"),
                              {f"APGD-CE, EOT {s['eot_chosen']}": self.curves["steps"]}, "APGD iterations",
                              "robust accuracy", "Audit: robust accuracy against iterations", settings=settings,
                              xticks=sorted(self.curves["steps"]))
        return [eot, steps]

    def write(self, out, title):
        """audit.md (titled) and the two plots under out: the paths of the plots."""
        plots = self.plot(out)
        with open(os.path.join(out, "audit.md"), "w") as f:
            f.write(self.to_markdown(title, [os.path.basename(p) for p in plots]))
        return plots


def _doubling(before, after):
    """The paired comparison of two attacks' per-input robustness (bool tensors, same inputs): the inputs
    only `before` leaves robust (lost by doubling), those only `after` does, and the one-sided exact
    McNemar p-value that doubling lowers robust accuracy."""
    lost, gained = int((before & ~after).sum()), int((after & ~before).sum())
    p = stats.binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue if lost + gained else 1.0
    return {"lost": lost, "gained": gained, "p_value": p}


def _white_box_name(eot, steps):
    return f"APGD-CE EOT {eot}, {steps} steps"


def _below(a, b):
    """Whether a lies below b beyond the intervals (a's interval entirely under b's)."""
    return a.interval()[1] < b.interval()[0]


def _active_noise(model):
    """(active, inactive) noise layers of model by name: active ones draw at test time."""
    named = [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, NOISE_LAYERS)]
    return ([name for name, m in named if m.training or m.mc], [name for name, m in named if not (m.training or m.mc)])


def _draws_from_torch(model, x):
    """Whether one forward moves torch's own generators (noise the library does not control). The
    pass runs in a stream Sandbox with torch's generators forked: nothing moves for real."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), Sandbox(), torch.no_grad():
        before = ensemble._generator_states(x.device)
        model(x)
        return ensemble._moved(before, x.device)


class _FixedNoise(torch.nn.Module):
    """The model with its noise frozen to one draw per input of one batch shape: every pass draws the
    same counters, from a sub-stream of each noise stream that the model's own passes never reach,
    so the streams do not move and no later judgement sees the draw the attack worked on. Noise is
    drawn per element (module docstring), so only a batch of the frozen shape keeps each input's
    draw: other shapes (a subset of the batch) are refused."""

    def __init__(self, model, shape):
        super().__init__()
        self.model, self.shape = model, tuple(shape)
        self.streams = [m for m in model.modules() if isinstance(m, Stream)]
        self.frozen = [derive_seed(s.seed, _FROZEN_SUBSTREAM) for s in self.streams]

    def forward(self, x):
        if tuple(x.shape) != self.shape:
            raise ValueError(f"the noise is frozen for batches of shape {self.shape}, got {tuple(x.shape)}")
        saved = [(s.seed.clone(), s.offset.clone()) for s in self.streams]
        try:
            with torch.no_grad():
                for s, seed in zip(self.streams, self.frozen):
                    s.seed.copy_(seed)
                    s.offset.zero_()
            with Sandbox():  # draws on private copies of the offsets, first met at the frozen state
                return self.model(x)
        finally:
            with torch.no_grad():
                for s, (seed, offset) in zip(self.streams, saved):
                    s.seed.copy_(seed)
                    s.offset.copy_(offset)


class _NoiseFree(torch.nn.Module):
    """The model's noise-free twin: every noise layer off (this thread's passes only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with noise_off():
            return self.model(x)


class _Auditor:
    """One audit's state: the model, inputs, budget, attack streams and the judged examples."""

    def __init__(self, model, x, y, eps, norm, steps, eot_cap, queries, judge_n, judgements, clip, seed):
        self.model, self.x, self.y, self.eps, self.norm, self.clip = model, x, y, eps, norm, clip
        self.steps, self.eot_cap, self.queries = steps, eot_cap, queries
        self.judge_n, self.judgements = judge_n, judgements
        self.streams, self.forks = Stream(seed).to(x.device), itertools.count()
        self.pooled, self.every = {}, {}  # attack -> per input: pooled judgement correct, every judgement correct
        self.figures = {}  # attack -> its robust accuracy (pooled judgement)
        self.stochastic, self.eot = True, 1  # what checks 1 and 2 find; later checks follow them
        self.eot_curve, self.steps_curve = {}, {}  # robust accuracy against EOT (check 2), steps (check 3)
        self.robust = self.worst = None  # the two figures (check 9)

    def judge(self, x_adv):
        """(pooled judgement correct, every judgement correct) per input, on fresh noise."""
        probs = torch.stack([ensemble.mc_predict(self.model, x_adv, self.judge_n) for _ in range(self.judgements)])
        every = (torch.stack([ensemble.decide(p) for p in probs]) == self.y).all(0)
        return ensemble.decide(probs.mean(0)) == self.y, every

    def judge_clean(self):
        """Judges the clean inputs; refuses a batch with no input classified correctly, on which every
        check would pass with nothing tested."""
        _check_labels(self.model, self.x, self.y)
        self.pooled["clean"], self.every["clean"] = self.judge(self.x)
        if not self.pooled["clean"].any():
            raise ValueError(f"no input is classified correctly clean (0 of {len(self.y)} by the pooled MC "
                             "judgement): nothing to attack; audit inputs the model gets right, or check the model "
                             "(NaN outputs?)")

    def record(self, name, x_adv, pool=True):
        """Judges x_adv; returns its robust accuracy (clean and attacked correct, pooled). Examples at
        the budget eps join the pool that robust_accuracy and robust_accuracy_worst take the worst of."""
        pooled, every = self.judge(x_adv)
        robust = pooled & self.pooled["clean"]
        if pool:
            self.pooled[name], self.every[name] = pooled, every
        self.figures[name] = Proportion(int(robust.sum()), len(self.y))
        return self.figures[name]

    def apgd_examples(self, model, eot, steps, eps=None, random_start=True):
        """APGD-CE's examples on model: one run over every input, none left out by the attack's own
        clean judgement (a lucky draw there would leave an input unattacked and count it robust)."""
        attack = APGD(model, norm=self.norm, eps=self.eps if eps is None else eps, steps=steps, loss="ce", eot=eot,
                      clip=self.clip, seed=0, random_start=random_start)
        attack.stream = self.streams.fork(next(self.forks))
        return attack.run_once(self.x, self.y)[0]

    def white_box(self, eot, steps):
        name = _white_box_name(eot, steps)
        if name not in self.figures:
            self.record(name, self.apgd_examples(self.model, eot, steps))
        return self.figures[name]

    def strongest_white_box(self):
        """The lowest robust accuracy of checks 3's two runs: what the other attacks must not beat."""
        return min(self.steps_curve.values())

    def doubling(self, before, after):
        """_doubling of two white-box runs given as (eot, steps)."""
        robust = [self.pooled[_white_box_name(e, s)] & self.pooled["clean"] for e, s in (before, after)]
        return _doubling(*robust)

    # ---- the checks --------------------------------------------------------------------------

    def randomness(self, passes=RANDOMNESS_PASSES):
        outs = ensemble.mc_predict(self.model, self.x, passes, reduce="none")
        differs = (outs != outs[:1]).flatten(2).any(2)  # (passes, B)
        active, inactive = _active_noise(self.model)
        torch_rng = _draws_from_torch(self.model, self.x)
        self.stochastic = bool(differs.any())
        protocol = (f"randomized: EOT gradients, {self.judgements} MC judgements of {self.judge_n} passes"
                    if self.stochastic else "deterministic: one pass is the prediction and the gradient (EOT 1)")
        numbers = {"passes": passes, "passes_differing_from_the_first": int(differs.any(1).sum()),
                   "inputs_whose_outputs_differ": int(differs.any(0).sum()), "active_noise_layers": active,
                   "inactive_noise_layers": inactive, "torch_generators": torch_rng, "protocol": protocol}
        if torch_rng:
            return Check("randomness", "warn", numbers, "The forward draws from torch's own generators (nn.Dropout "
                         "in training mode, torch.randn): noise the library cannot reproduce per replica or from the "
                         "audit's seed; use the library's noise layers, or model.eval() if it should be off at test "
                         "time.")
        if self.stochastic:
            return Check("randomness", "pass", numbers, "The prediction is stochastic, all of its noise from the "
                         "library's streams: the audit attacks with EOT and judges by MC predictions on fresh noise.")
        return Check("randomness", "pass", numbers, "The prediction is deterministic (passes agree): one pass is the "
                     "model, so EOT, fixed-randomness and transfer checks have nothing to test." +
                     (" Noise layers are present but off at test time: turn them on (set_test_noise) to audit the "
                      "randomized defense." if inactive else ""))

    def eot_sufficiency(self):
        curve, doublings, eot = {}, {}, 1
        while True:
            curve[eot] = self.white_box(eot, self.steps)
            if eot > 1:
                doublings[eot] = self.doubling((eot // 2, self.steps), (eot, self.steps))
            settled = eot in doublings and doublings[eot]["p_value"] >= LOWERED_ALPHA
            if not self.stochastic or settled or 2 * eot > self.eot_cap:
                break
            eot *= 2
        self.eot, self.eot_curve = eot, curve
        numbers = {"robust_accuracy_by_eot": curve, "doubling_by_eot": doublings, "eot_chosen": eot,
                   "eot_cap": self.eot_cap}
        if not self.stochastic:
            return Check("EOT sufficiency", "pass", numbers, "Deterministic model: one draw is the exact gradient.")
        if settled:
            return Check("EOT sufficiency", "pass", numbers, f"Doubling EOT from {eot // 2} to {eot} did not lower "
                         f"robust accuracy (paired test, p >= {LOWERED_ALPHA}): more samples per gradient would not "
                         f"change the estimate; the audit uses EOT {eot}.")
        if eot == 1:
            return Check("EOT sufficiency", "warn", numbers, "Only EOT 1 ran (eot_cap 1): whether more samples per "
                         "gradient lower robust accuracy is untested; raise eot_cap (--eot-cap) to at least 2.")
        return Check("EOT sufficiency", "warn", numbers, f"Doubling EOT still lowered robust accuracy at the cap of "
                     f"{self.eot_cap} (paired test, p < {LOWERED_ALPHA}): the gradient estimate is too noisy and the "
                     "figure is an overestimate; raise eot_cap (--eot-cap) until a doubling does not lower it.")

    def iteration_sufficiency(self):
        base, doubled = self.white_box(self.eot, self.steps), self.white_box(self.eot, 2 * self.steps)
        self.steps_curve = {self.steps: base, 2 * self.steps: doubled}
        doubling = self.doubling((self.eot, self.steps), (self.eot, 2 * self.steps))
        numbers = {"robust_accuracy_by_steps": self.steps_curve, "doubling": doubling, "eot": self.eot}
        if doubling["p_value"] < LOWERED_ALPHA:
            return Check("iteration sufficiency", "warn", numbers, f"Doubling the iterations to {2 * self.steps} "
                         f"lowered robust accuracy (paired test, p < {LOWERED_ALPHA}): the attack had not converged; "
                         "raise steps (--steps).")
        return Check("iteration sufficiency", "pass", numbers, f"Doubling the iterations to {2 * self.steps} did not "
                     f"lower robust accuracy (paired test, p >= {LOWERED_ALPHA}).")

    def fixed_randomness(self):
        if not self.stochastic:
            return Check("fixed randomness", "pass", {}, "Deterministic model: its randomness is already fixed.")
        fixed = _FixedNoise(self.model, self.x.shape)
        x_adv = self.apgd_examples(fixed, eot=1, steps=self.steps)  # one pass is the fixed model's prediction
        with torch.no_grad():
            on_fixed = ((ensemble.decide(fixed(self.x)) == self.y) & (ensemble.decide(fixed(x_adv)) == self.y))
        fixed_acc = Proportion(int(on_fixed.sum()), len(self.y))
        noisy = self.white_box(self.eot, self.steps)
        reenabled = self.record("APGD-CE on fixed noise, judged with noise", x_adv)
        numbers = {"robust_accuracy_noise_fixed": fixed_acc, "robust_accuracy_noisy": noisy,
                   "robust_accuracy_fixed_examples_with_noise": reenabled}
        if _below(noisy, fixed_acc):
            return Check("fixed randomness", "warn", numbers, "With the noise fixed the attack succeeds less often than "
                         "on the noisy model: something other than randomness (masked or saturated gradients) stops it; "
                         "see checks 5 and 7.")
        return Check("fixed randomness", "pass", numbers, "With the noise fixed the attack succeeds at least as often "
                     "as on the noisy model, as it should; re-enabling the noise on its examples shows what the "
                     "randomness buys.")

    def unbounded(self):
        lo, hi = self.clip
        size = hi - lo if self.norm == "Linf" else (hi - lo) * math.sqrt(self.x[0].numel())
        acc = self.record(f"{_white_box_name(self.eot, self.steps)}, unbounded eps {size:g}",
                          # from x itself: a random start in the whole range is a random input, which
                          # could succeed where the gradient is masked
                          self.apgd_examples(self.model, self.eot, self.steps, eps=size, random_start=False),
                          pool=False)
        numbers = {"eps": size, "robust_accuracy": acc}
        if not acc.count:
            return Check("unbounded attack", "pass", numbers, "At eps covering the whole input range robust accuracy "
                         "reaches 0.")
        if acc <= UNBOUNDED_FEW:
            return Check("unbounded attack", "warn", numbers, "An attack allowed the whole input range leaves a few "
                         "inputs classified correctly: examples judged near the decision boundary, or too few steps; "
                         "rerun with more steps (--steps) before trusting the figures.")
        return Check("unbounded attack", "fail", numbers, "An attack allowed the whole input range leaves inputs "
                     "classified correctly: gradients are masked (or the attack is broken); attack a differentiable "
                     "approximation (BPDA) or check the loss.")

    def black_box(self):
        white = self.strongest_white_box()
        if self.norm != "Linf" or self.x.dim() != 4:
            return Check("white-box beats black-box", "warn", {"robust_accuracy_white_box": white},
                         "Not run: Square here attacks L-inf images (B, C, H, W); compare a black-box attack yourself.")
        attack = Square(self.model, eps=self.eps, queries=self.queries, eot=self.eot, judge_n=self.judge_n,
                        clip=self.clip, seed=0)
        attack.stream = self.streams.fork(next(self.forks))
        black = self.record(f"Square EOT {self.eot}, {self.queries} queries", attack.perturb(self.x, self.y))
        numbers = {"robust_accuracy_square": black, "robust_accuracy_white_box": white}
        if _below(black, white):
            return Check("white-box beats black-box", "fail", numbers, "A black-box attack beats the gradient attack "
                         "beyond the interval: the gradients are uninformative (masked or too noisy); raise EOT, use "
                         "BPDA.")
        return Check("white-box beats black-box", "pass", numbers, "The black-box Square attack does not beat APGD-EOT "
                     "beyond the interval.")

    def zero_gradients(self):
        def summed_ce(logits, y):  # per-input gradients: each row's loss depends on its own input
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        grad = ensemble.eot_grad(self.model, summed_ce, self.x, self.y, self.eot)[0].flatten(1)
        zero, nonfinite = grad.eq(0).all(1), ~grad.isfinite().all(1)
        share = Proportion(int((zero | nonfinite).sum()), len(self.y))
        numbers = {"inputs_with_zero_gradient": Proportion(int(zero.sum()), len(self.y)),
                   "inputs_with_nonfinite_gradient": Proportion(int(nonfinite.sum()), len(self.y)), "eot": self.eot}
        if not share.count:
            return Check("zero gradients", "pass", numbers, "Every input has a non-zero, finite EOT gradient.")
        verdict = "fail" if share > ZERO_GRADIENT_FAIL else "warn"
        return Check("zero gradients", verdict, numbers, "Inputs with an all-zero (or NaN, infinite) EOT gradient give "
                     "gradient attacks nothing to follow: a non-differentiable layer (attack it with BPDA: a "
                     "differentiable stand-in in the backward), a saturated loss (use the DLR loss) or overflow.")

    def transfer(self):
        if not self.stochastic:
            return Check("transfer", "pass", {}, "Deterministic model: it is its own noise-free twin.")
        x_adv = self.apgd_examples(_NoiseFree(self.model), eot=1, steps=self.steps)
        transferred = self.record("APGD-CE on the noise-free twin", x_adv)
        white = self.strongest_white_box()
        numbers = {"robust_accuracy_transfer": transferred, "robust_accuracy_white_box": white}
        if _below(transferred, white):
            return Check("transfer", "fail", numbers, "Examples crafted on the noise-free twin beat the white-box "
                         "attack beyond the interval: the noisy model's gradients are uninformative; raise EOT, check "
                         "masking.")
        return Check("transfer", "pass", numbers, "Examples from the noise-free twin are no stronger than white-box "
                     "ones.")

    def final_judgement(self):
        attacks = [name for name in self.pooled if name != "clean"]
        pooled = torch.stack(list(self.pooled.values())).all(0)
        worst = pooled & torch.stack(list(self.every.values())).all(0)
        self.robust = Proportion(int(pooled.sum()), len(self.y))
        self.worst = Proportion(int(worst.sum()), len(self.y))
        numbers = {"robust_accuracy": self.robust, "robust_accuracy_worst": self.worst,
                   "random_escapes": Proportion(int((pooled & ~worst).sum()), len(self.y)),
                   "judgements": self.judgements, "judge_n": self.judge_n, "attacks": attacks}
        if self.worst < self.robust.interval()[0]:
            return Check("final judgement", "warn", numbers, "The worst-case figure lies below the pooled figure's "
                         "interval: more inputs survive only by the luck of a draw (some judgement fooled) than the "
                         "sampling error covers; report the worst-case figure beside the pooled one.")
        return Check("final judgement", "pass", numbers, f"Every example was judged {self.judgements} times on fresh "
                     "noise; the worst-case figure lies within the pooled figure's interval.")


@contextlib.contextmanager
def _torch_generators_seeded(seed, device):
    """torch's generators seeded with `seed` meanwhile, the caller's put back after: a model that draws
    from them (nn.Dropout in training mode) repeats with the audit's seed and moves nothing outside."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _check_labels(model, x, y):
    """The labels against the model's classes, found by one pass that moves no stream."""
    with Sandbox(), torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model must return (B, C) logits, got {getattr(out, 'shape', type(out).__name__)}")
    classes = out.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"y must hold class indices in [0, {classes}) (the model has {classes} classes), got labels "
                         f"in [{int(y.min())}, {int(y.max())}]")


def _check_clip(clip):
    lo, hi = (float(v) for v in clip)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clip must be finite (lo, hi) with lo < hi, got {clip!r}")
    return lo, hi


def audit(model, x, y, eps, norm="Linf", *, steps=10, eot_cap=16, queries=100, judge_n=20, judgements=3,
          clip=(0.0, 1.0), seed=0):
    """The nine checks on model at (x, y) and budget eps (module docstring): a Report.

    steps: APGD iterations (check 3 doubles them); eot_cap: the largest EOT of check 2's doubling;
    queries: Square's budget; judge_n: MC passes of one judgement; judgements: independent
    judgements of every example (>= 3); clip: the input range; seed: the attacks' streams and the
    model's noise during the audit."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = _check_nonnegative(eps, "eps")
    if eps == 0:
        raise ValueError("eps must be > 0, got 0")
    for value, name in ((steps, "steps"), (eot_cap, "eot_cap"), (queries, "queries"), (judge_n, "judge_n")):
        _check_positive_int(value, name)
    _check_positive_int(judgements, "judgements", minimum=3)
    _check_positive_int(seed, "seed", minimum=0)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or not len(x):
        raise ValueError("x must be a non-empty floating batch (B, ...)")
    if (not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.is_floating_point() or y.is_complex()
            or y.dtype == torch.bool):
        raise ValueError(f"y must be integer labels, one per input ({x.shape[0]})")
    clip = _check_clip(clip)
    if not (x.isfinite().all() and x.min() >= clip[0] and x.max() <= clip[1]):
        raise ValueError(f"x must be finite and lie in clip {clip}, got values in [{x.min():g}, {x.max():g}]")
    settings = {"eps": eps, "norm": norm, "inputs": len(y), "steps": steps, "eot_cap": eot_cap, "queries": queries,
                "judge_n": judge_n, "judgements": judgements, "clip": list(clip), "seed": seed}
    auditor = _Auditor(model, x.detach(), y.long(), eps, norm, steps, eot_cap, queries, judge_n, judgements, clip,
                       seed)
    checks, seconds = [], {}
    with _torch_generators_seeded(seed, x.device), distributed.reseeded(model, seed, 0):
        auditor.judge_clean()
        for step in (auditor.randomness, auditor.eot_sufficiency, auditor.iteration_sufficiency,
                     auditor.fixed_randomness, auditor.unbounded, auditor.black_box, auditor.zero_gradients,
                     auditor.transfer, auditor.final_judgement):
            start = time.perf_counter()
            checks.append(step())
            seconds[checks[-1].name] = time.perf_counter() - start
    clean = Proportion(int(auditor.pooled["clean"].sum()), len(y))
    attacks = {name: p for name, p in auditor.figures.items() if name in auditor.pooled}
    settings["eot_chosen"] = auditor.eot
    return Report(checks, clean, auditor.robust, auditor.worst, attacks,
                  {"eot": auditor.eot_curve, "steps": auditor.steps_curve}, settings, seconds)


__all__ = ["Check", "Report", "VERDICTS", "audit"]
