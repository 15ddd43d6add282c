"""Evaluation drivers shared by the command line and the demo: clean accuracy (noise off, one noisy
pass, MC mean, vote), robust accuracy under any attack of noisekernels.attacks judged by the MC
prediction on noise independent of the attack's, the engine's time against the loop of n passes,
and the plots."""

import inspect
import json
import math
import os
import time

import torch

from . import attacks as attack_module
from . import ensemble, metrics

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


@torch.no_grad()
def clean_accuracy(model, x, y, n=10):
    """{noise_off, single, mean, vote}: noise switched off; one pass with the preset's test-time
    noise; argmax of the MC mean and of the vote over n passes."""
    return {"noise_off": (ensemble.deterministic_predict(model, x).argmax(1) == y).float().mean().item(),
            "single": metrics.accuracy(model, x, y, mode="single"),
            "mean": metrics.accuracy(model, x, y, mode="mean", n=n),
            "vote": metrics.accuracy(model, x, y, mode="vote", n=n)}


def accuracy_vs_n(model, x, y, ns, mode="mean"):
    """{n: accuracy of the MC prediction over n passes}."""
    return {n: metrics.accuracy(model, x, y, mode=mode, n=n) for n in ns}


def robust_accuracy(model, x, y, name, eps_list, options, *, judge_n=10, seed=0):
    """{eps: robust accuracy} under attack `name`, judged by the MC mean over judge_n passes of the
    model on noise drawn after the attack (independent of the draws it selected with).

    Attacks with an eps run once per eps (options may give alpha as a fraction of eps:
    alpha_ratio). Minimum-norm attacks (CW) run once; an input counts as robust at eps when the
    attack failed or needed an L2 distortion above eps."""
    options = dict(options)
    ratio = options.pop("alpha_ratio", None)
    options.setdefault("seed", seed)
    options.setdefault("judge_n", judge_n)
    if uses_eps(name):
        result = {}
        for eps in eps_list:
            extra = {"eps": eps}
            if ratio is not None:
                extra["alpha"] = eps * ratio
            x_adv = make_attack(name, model, {**options, **extra})(x, y)
            result[eps] = metrics.accuracy(model, x_adv, y, mode="mean", n=judge_n)
        return result
    if ratio is not None:
        raise ValueError(f"alpha_ratio needs an attack with eps and alpha, not {name}")
    attack = make_attack(name, model, options)
    x_adv = attack(x, y)
    l2 = getattr(attack, "l2", None)
    if l2 is None:
        raise ValueError(f"attack {name} has neither eps nor a per-input L2 (attack.l2)")
    result = {}
    for eps in eps_list:
        within = (l2 <= eps).view(-1, *([1] * (x.dim() - 1)))
        result[eps] = metrics.accuracy(model, torch.where(within, x_adv, x), y, mode="mean", n=judge_n)
    return result


def sharded_robust_accuracy(model, x, y, name, eps_list, options, *, judge_n=10, seed=0, batch_size=100):
    """robust_accuracy with the inputs split into batches dealt to torchrun ranks (one process
    outside torchrun): every batch draws from streams derived from (seed, batch index), so the
    gathered result is the same for any number of processes. An input is robust at eps when the
    attack's independent MC verdict says it was not fooled and the clean input was classified
    correctly. Minimum-norm attacks (CW) run in one process only."""
    from . import distributed
    options = dict(options)
    ratio = options.pop("alpha_ratio", None)
    for key, flag in (("seed", "--seed"), ("judge_n", "--judge-n")):
        if key in options:
            raise ValueError(f"give {key} with {flag}, not as an attack option")
    if ratio is not None and "alpha" in options:
        raise ValueError("give alpha or alpha_ratio (alpha = eps * ratio), not both")
    options["judge_n"] = judge_n
    if not uses_eps(name):
        rank, world = distributed._rank_world(None, None)
        if world > 1:
            raise ValueError(f"attack {name} has no eps: it runs in one process (without torchrun)")
        return robust_accuracy(model, x, y, name, eps_list, {**options, **({} if ratio is None else {"alpha_ratio": ratio})},
                               judge_n=judge_n, seed=seed)
    result = {}
    for eps in eps_list:
        extra = {"eps": eps} if ratio is None else {"eps": eps, "alpha": eps * ratio}
        rows = distributed.gather(distributed.attack_dataset(
            model, lambda s: make_attack(name, model, {**options, **extra, "seed": s}), x, y,
            batch_size=batch_size, seed=seed))
        result[eps] = int(rows["robust"].sum()) / len(rows["robust"]) if len(rows["robust"]) else math.nan
    return result


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


def plot(path, curves, xlabel, ylabel, title, xlog=False):
    """One line per name of curves {name: {x: y}} into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[v] for v in xs], marker="o", label=name)
    if xlog:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(title, header, rows):
    """A right-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [title, "  ".join(str(h).rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def timing_table(results, batch):
    rows = []
    for run_dir, t in results.items():
        name = os.path.basename(os.path.normpath(run_dir))
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


__all__ = ["accuracy_vs_n", "attack_names", "attack_parameters", "clean_accuracy", "engine_timing", "make_attack",
           "plot", "robust_accuracy", "table", "timing_table", "uses_eps", "write_json"]
