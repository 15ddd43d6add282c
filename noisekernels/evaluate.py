"""Evaluation drivers shared by the command line and the demo: clean accuracy (noise off, one noisy
pass, MC mean, vote), robust accuracy under any attack of noisekernels.attacks judged by the MC
prediction on noise independent of the attack's, the engine's time against the loop of n passes,
and the plots."""

import dataclasses
import inspect
import itertools
import json
import math
import platform
import sys
import textwrap
import time

import numpy as np
import scipy
import torch

from . import attacks as attack_module
from . import distributed, ensemble, metrics
from .attacks.base import JUDGE_N

# Attacks built from a model and options alone (MultiSurrogate needs surrogate models).
_NOT_STANDALONE = {"Attack", "MultiSurrogate"}


def attack_names():
    """Every attack of noisekernels.attacks that runs on one model, by class name."""
    return sorted(name for name in attack_module.__all__
                  if name not in _NOT_STANDALONE and isinstance(getattr(attack_module, name), type)
                  and issubclass(getattr(attack_module, name), attack_module.Attack))


def _attack_class(name):
    names = attack_names()
    if name not in names:
        raise ValueError(f"attack must be one of {names}, got {name!r}")
    return getattr(attack_module, name)


def attack_parameters(name):
    """The keyword options an attack accepts (its own and the shared base's)."""
    cls = _attack_class(name)
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model", "kwargs")]
    base = [p for p in inspect.signature(attack_module.Attack.__init__).parameters if p not in ("self", "model")]
    return own + [p for p in base if p not in own]


def attack_settings(name, options):
    """Every keyword option of attack `name` with its value: options where given, else the default."""
    cls = _attack_class(name)
    defaults = {}
    for fn in (attack_module.Attack.__init__, cls.__init__):
        defaults.update({p.name: p.default for p in inspect.signature(fn).parameters.values()
                         if p.default is not inspect.Parameter.empty})
    return {k: options.get(k, defaults.get(k)) for k in attack_parameters(name)}


def make_attack(name, model, options):
    """attack `name` on model with `options` (checked against its parameters: a clear error names
    an unknown option and lists the accepted ones)."""
    cls = _attack_class(name)
    accepted = attack_parameters(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attack {name}; accepted: {accepted}")
    return cls(model, **options)


def uses_eps(name):
    return "eps" in attack_parameters(name)


def progress_bar(total, desc, enabled=True):
    """A tqdm bar that draws only on a terminal (never into a redirected log) and clears itself."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, disable=None if enabled else True)


def stage_line(text, enabled=True):
    """One plain line on stderr when a stage ends: what a log keeps of the progress."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


def versions():
    """The versions a result depends on: this library (and its extension's build), torch, Python."""
    import noisekernels
    return {"noisekernels": noisekernels.__version__, "build": noisekernels.build_info(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version()}


def _correct(pred, y):
    return metrics.Proportion(int((pred == y).sum()), len(y))


@torch.no_grad()
def clean_accuracy(model, x, y, n=10, *, progress=None):
    """{noise_off, single, mean, vote}: noise switched off; one pass with the preset's test-time
    noise; argmax of the MC mean and of the vote over n passes. Each a metrics.Proportion (the
    fraction, with the count behind it). progress: a tqdm bar advanced once per measure."""
    out = {"noise_off": _correct(metrics.decide(ensemble.deterministic_predict(model, x)), y)}
    _advance(progress)
    for mode in ("single", "mean", "vote"):
        out[mode] = metrics.accuracy(model, x, y, mode=mode, n=n)
        _advance(progress)
    return out


def accuracy_vs_n(model, x, y, ns, mode="mean", *, progress=None):
    """{n: accuracy (a Proportion) of the MC prediction over n passes}."""
    out = {}
    for n in ns:
        out[n] = metrics.accuracy(model, x, y, mode=mode, n=n)
        _advance(progress)
    return out


def _advance(bar):
    if bar is not None:
        bar.update(1)


@dataclasses.dataclass
class AttackResult:
    """Robust accuracy under an attack, and example by example what it rests on.

    clean: the Proportion of inputs the judge classifies correctly (the eps = 0 point); robust:
    {eps: the Proportion classified correctly both clean and attacked}; examples: {eps: {column:
    tensor}}, one row per input in dataset order: index, label, clean_prediction,
    adversarial_prediction (the judge's; metrics.NO_CLASS where its scores are NaN), clean_correct
    (clean_prediction == label), success (adversarial_prediction != label, so also true for an
    input misclassified before the attack, and true where the attack skipped an input its own clean
    judgement found fooled, attack.clean_fooled: robust is clean_correct and not success), linf and l2
    (the adversarial example's distance to the input), and x_adv when asked for; seconds: {"attack": crafting, "judging": the judge's MC
    predictions}, summed over processes."""
    clean: metrics.Proportion
    robust: dict
    examples: dict
    seconds: dict

    def as_json(self):
        """Counts, fractions, 95% Clopper-Pearson intervals, per-example columns (without x_adv)
        and timings, as plain JSON values."""
        return {"clean_accuracy": self.clean.as_dict(),
                "robust_accuracy": {str(eps): p.as_dict() for eps, p in self.robust.items()},
                "seconds": self.seconds,
                "examples": {str(eps): {k: v.tolist() for k, v in table.items() if k != "x_adv"}
                             for eps, table in self.examples.items()}}


def distinct_eps(eps_list):
    """eps_list as a list, refusing a budget given twice (results are keyed by eps)."""
    eps_list = list(eps_list)
    twice = sorted({eps for eps in eps_list if eps_list.count(eps) > 1})
    if twice:
        raise ValueError(f"eps {', '.join(f'{e:g}' for e in twice)} given more than once: each budget once")
    return eps_list


def _attack_options(name, options, judge_n):
    """options without alpha_ratio (returned apart) and with judge_n, refusing what has a flag of its own."""
    options = dict(options)
    ratio = options.pop("alpha_ratio", None)
    for key, flag in (("seed", "--seed"), ("judge_n", "--judge-n")):
        if key in options:
            raise ValueError(f"give {key} with {flag}, not as an attack option")
    if ratio is not None and "alpha" in options:
        raise ValueError("give alpha or alpha_ratio (alpha = eps * ratio), not both")
    if ratio is not None and not uses_eps(name):
        raise ValueError(f"alpha_ratio needs an attack with eps and alpha, not {name}")
    return {**options, "judge_n": judge_n}, ratio


class _Clock:
    """Seconds spent crafting and judging."""

    def __init__(self):
        self.seconds = {"attack": 0.0, "judging": 0.0}

    def craft(self, attack, x, y):
        start = time.perf_counter()
        x_adv = attack.perturb(x, y)
        self.seconds["attack"] += time.perf_counter() - start
        return x_adv

    def judge(self, attack, x):
        """The attack's verdict (its judge and judge_n on fresh noise), as metrics.predict decides."""
        start = time.perf_counter()
        pred = metrics.predict(attack.model, x, mode=attack.judge, n=attack.judge_n)
        self.seconds["judging"] += time.perf_counter() - start
        return pred


def _attack_batch(model, name, options, ratio, eps_list, x, y, seed, clock):
    """(clean prediction, {eps: adversarial batch}, {eps: its prediction}, {eps: success}) of one batch.

    Attacks with an eps run once per eps. Minimum-norm attacks (CW) run once; their example at eps
    is the adversarial one where the attack succeeded within an L2 distortion of eps, else x."""
    def build(extra):
        attack = make_attack(name, model, {**options, **extra, "seed": seed})
        if attack.targeted:
            raise ValueError("robust accuracy needs an untargeted attack: targeted=True is not accepted")
        return attack

    if uses_eps(name):
        attacks = {eps: build({"eps": eps, **({} if ratio is None else {"alpha": eps * ratio})}) for eps in eps_list}
        clean = clock.judge(attacks[eps_list[0]], x)
        adversarial = {eps: clock.craft(attack, x, y) for eps, attack in attacks.items()}
        predicted = {eps: clock.judge(attacks[eps], x_adv) for eps, x_adv in adversarial.items()}
        return clean, adversarial, predicted, {eps: attacks[eps].with_skipped(p != y) for eps, p in predicted.items()}
    attack = build({})
    clean = clock.judge(attack, x)
    x_adv = clock.craft(attack, x, y)
    attack.success = clock.judge(attack, x_adv) != y  # the verdict attack(x, y) keeps; attack.l2 reads it
    l2 = getattr(attack, "l2", None)
    if l2 is None:
        raise ValueError(f"attack {name} has neither eps nor a per-input L2 (attack.l2)")
    adversarial = {eps: torch.where((l2 <= eps).view(-1, *([1] * (x.dim() - 1))), x_adv, x) for eps in eps_list}
    predicted = {eps: clock.judge(attack, x_eps) for eps, x_eps in adversarial.items()}
    return clean, adversarial, predicted, {eps: attack.with_skipped(p != y) for eps, p in predicted.items()}


def _empty_table(x, y, keep_adversarial):
    long, double = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    boolean = torch.zeros(0, dtype=torch.bool)
    table = {"index": long, "label": y[:0].cpu(), "clean_prediction": long, "adversarial_prediction": long,
             "clean_correct": boolean, "success": boolean, "linf": double, "l2": double}
    return {**table, "x_adv": x[:0].cpu()} if keep_adversarial else table


def robust_accuracy(model, x, y, name, eps_list, options, *, judge_n=JUDGE_N, seed=0, batch_size=100,
                    keep_adversarial=False, progress=False):
    """An AttackResult: robust accuracy under attack `name` at each eps of eps_list, judged by
    the MC prediction over judge_n passes (options' judge: the mean, or "vote") on noise drawn after
    the attack (independent of the draws it selected with). An input is robust at eps when the
    judge classifies it correctly both clean and attacked.

    The inputs are split into batches of batch_size dealt to torchrun ranks (one process outside
    torchrun); every batch draws from streams derived from (seed, batch index), so the gathered
    result is the same for any number of processes. options may give alpha as a fraction of eps
    (alpha_ratio). keep_adversarial: keep the adversarial examples (examples[eps]["x_adv"]).
    progress: a progress bar (on a terminal only)."""
    options, ratio = _attack_options(name, options, judge_n)
    eps_list = distinct_eps(eps_list)
    if not eps_list:
        raise ValueError("eps_list must hold at least one eps")
    clock = _Clock()
    rows = {eps: [] for eps in eps_list}
    batches = distributed.shard(x.shape[0], batch_size)
    with progress_bar(len(batches), name, progress) as bar:
        for b, start, stop in batches:
            xb, yb = x[start:stop], y[start:stop]
            with distributed.reseeded(model, seed, b):
                clean, adversarial, predicted, success = _attack_batch(model, name, options, ratio, eps_list, xb, yb,
                                                              distributed.batch_seed(seed, b), clock)
            for eps, x_adv in adversarial.items():
                distance = (x_adv.double() - xb.double()).flatten(1)
                row = {"index": torch.arange(start, stop), "label": yb, "clean_prediction": clean,
                       "adversarial_prediction": predicted[eps], "clean_correct": clean == yb,
                       "success": success[eps],
                       "linf": distance.abs().amax(1), "l2": distance.norm(dim=1)}
                if keep_adversarial:
                    row["x_adv"] = x_adv
                rows[eps].append({k: v.cpu() for k, v in row.items()})
            bar.update(1)
    empty = _empty_table(x, y, keep_adversarial)
    examples = {eps: distributed.gather({k: torch.cat([r[k] for r in parts]) for k in empty} if parts else empty)
                for eps, parts in rows.items()}
    spent = distributed.gather({"index": torch.zeros(1, dtype=torch.long),
                                **{k: torch.tensor([v], dtype=torch.float64) for k, v in clock.seconds.items()}})
    first = examples[eps_list[0]]
    return AttackResult(clean=_correct(first["clean_prediction"], first["label"]),
                        robust={eps: metrics.Proportion(int((t["clean_correct"] & ~t["success"]).sum()), len(t["label"]))
                                for eps, t in examples.items()},
                        examples=examples, seconds={k: float(spent[k].sum()) for k in clock.seconds})


def _timed(fn, repeats=3):
    fn()  # warm-up (plans, caches)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def engine_timing(model, x, y, n):
    """Seconds (best of 3) of mc_predict and eot_grad over n draws against the loop of n passes, and
    the plans (tuned before timing). A model without noise is timed for its one pass only: a loop
    repeating identical passes is no baseline."""
    loss = torch.nn.functional.cross_entropy
    plans = {"mc": ensemble.plan(model, x, n), "eot": ensemble.plan(model, x, n, grad=True)}
    described = {k: f"{p.mode}" + (f" x{p.chunk}" if p.mode in ("shared", "replicate") else "") for k, p in plans.items()}
    if plans["mc"].mode == "deterministic":
        return {"n": n, "plan": "deterministic", "noise": False,
                "mc_engine_s": _timed(lambda: ensemble.mc_predict(model, x, n)),
                "eot_engine_s": _timed(lambda: ensemble.eot_grad(model, loss, x, y, n))}

    def mc_loop():
        with torch.no_grad():
            return sum(torch.softmax(model(x), 1) for _ in range(n)) / n

    def eot_loop():
        xr = x.detach().requires_grad_(True)
        return sum(torch.autograd.grad(loss(model(xr), y), xr)[0] for _ in range(n)) / n

    return {"n": n, "plan": f"MC {described['mc']}, EOT {described['eot']}", "noise": True,
            "mc_engine_s": _timed(lambda: ensemble.mc_predict(model, x, n)), "mc_loop_s": _timed(mc_loop),
            "eot_engine_s": _timed(lambda: ensemble.eot_grad(model, loss, x, y, n)), "eot_loop_s": _timed(eot_loop)}


# Lines that overlap stay apart: each curve has its own marker and dash pattern.
_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]


def styles():
    """(marker, linestyle) pairs, one per curve of a plot (cycling)."""
    return itertools.cycle(_STYLES)


def titled(ax, title, settings):
    """The plot's title and, below it in small type, its settings (a dict or a string)."""
    if isinstance(settings, dict):
        settings = ", ".join(f"{k} {v}" for k, v in settings.items())
    text = title if not settings else title + "\n" + textwrap.fill(settings, 90)
    ax.set_title(text, fontsize=9)


def plot(path, curves, xlabel, ylabel, title, *, settings=None, xlog=False, xticks=None):
    """One line per name of curves {name: {x: y}} into a PNG, titled with the settings; where the
    values are metrics.Proportions, their 95% Clopper-Pearson intervals as bands. xticks: label
    exactly these x values."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, points), (marker, dashes) in zip(curves.items(), styles()):
        xs = sorted(points)
        line, = ax.plot(xs, [points[v] for v in xs], marker=marker, linestyle=dashes, markerfacecolor="none",
                        label=name)
        if all(isinstance(points[v], metrics.Proportion) for v in xs):
            lo, hi = zip(*(points[v].interval() for v in xs))
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if xlog:
        ax.set_xscale("log")
    if xticks is not None:  # a log axis would label its minor ticks too (2x10^0, ...)
        ax.set_xticks(list(xticks), [f"{v:g}" for v in xticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
    titled(ax, title, settings)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="bands: 95% Clopper-Pearson", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title, "Description": str(settings or "")})
    plt.close(fig)
    return path


def table(title, header, rows):
    """A right-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [title, "  ".join(str(h).rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def timing_table(results, batch):
    rows = []
    for name, t in results.items():
        if not t["noise"]:  # one pass stands for all n: nothing to speed up
            rows.append([name, "no noise: one pass", f"{1e3 * t['mc_engine_s']:.1f}", "-", "-",
                         f"{1e3 * t['eot_engine_s']:.1f}", "-", "-"])
            continue
        rows.append([name, t["plan"], f"{1e3 * t['mc_engine_s']:.1f}", f"{1e3 * t['mc_loop_s']:.1f}",
                     f"{t['mc_loop_s'] / t['mc_engine_s']:.2f}x", f"{1e3 * t['eot_engine_s']:.1f}",
                     f"{1e3 * t['eot_loop_s']:.1f}", f"{t['eot_loop_s'] / t['eot_engine_s']:.2f}x"])
    n = next(iter(results.values()))["n"]
    return table(f"MC/EOT engine against the loop of n={n} passes (ms, best of 3, batch {batch})",
                  ["model", "plan", "MC engine", "MC loop", "speed-up", "EOT engine", "EOT loop", "speed-up"], rows)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


__all__ = ["AttackResult", "accuracy_vs_n", "attack_names", "attack_parameters", "attack_settings", "clean_accuracy",
           "distinct_eps", "engine_timing", "make_attack", "plot", "progress_bar", "robust_accuracy", "stage_line",
           "table", "timing_table", "uses_eps", "versions", "write_json"]
