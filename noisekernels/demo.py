"""The main job (`noisekernels demo`): train standard, RS-1, RSE, A2SNN, PNI-Adv and GDA+BReLU on
the bundled digits (or `--dataset mnist-5k`, 5,000 real MNIST digits: about 25 minutes), print per model its clean accuracy (noise off, one pass, MC mean, vote) and its
robust accuracy under PGD-EOT at three eps judged by the MC mean on independent noise, write the
plots, time the MC/EOT engine against the loop of n passes, and end by auditing RSE
(noisekernels.audit: the adaptive-evaluation checklist) into audit.md.

The figures are whatever the run measures; nothing is tuned toward a paper's claim. Trained models
are kept in the run directory, so running the demo again evaluates them without retraining.
"""

import dataclasses
import os
import time

import torch

from . import data, evaluate
from .attacks.base import JUDGE_N
from .audit import audit
from .train import TrainConfig, Trainer, has_checkpoint

SMALL_CNN = {"widths": (16, 32), "dense": 128}
# (label, defense, architecture, its sizes, defense options). Architectures are the papers' (the
# MNIST CNN; LeNet++ with its 32-d layer for A2SNN), narrowed for 8x8 digits. RSE keeps the paper's
# CIFAR noise levels (it has no MNIST-like experiment); PNI-Adv trains on PGD at the middle eps.
MODELS = [
    ("standard", "standard", "mnist-cnn", SMALL_CNN, {}),
    ("rs1", "rs1", "mnist-cnn", SMALL_CNN, {}),
    ("rse", "rse", "mnist-cnn", SMALL_CNN, {}),
    ("a2snn", "a2snn", "lenet++", {"widths": (16, 32, 64), "embed": 32}, {}),
    ("pni-adv", "pni", "mnist-cnn", SMALL_CNN, {"adv_eps": 0.1, "adv_steps": 5}),
    ("gda-brelu", "gda", "mnist-cnn", SMALL_CNN, {"brelu": 1.0}),
]
EPS = (0.05, 0.1, 0.2)
AUDITED, AUDIT_EPS = "rse", 0.1  # the defense the demo ends by auditing (noisekernels audit)


@dataclasses.dataclass
class Settings:
    epochs: int = 15
    test_inputs: int = 450  # the whole digits test split (the first 450 of mnist-5k's 1,000)
    n: int = 20  # MC passes of the clean evaluation
    judge_n: int = JUDGE_N  # MC passes of the judge (printed with the results)
    pgd_steps: int = 10
    eot: int = 10
    timing_n: int = 20
    timing_batch: int = 200
    audit_inputs: int = 200  # the audit of AUDITED at eps AUDIT_EPS, on the first test inputs
    audit_budget: dict = dataclasses.field(default_factory=dict)  # audit()'s defaults, or these


QUICK = Settings(epochs=1, test_inputs=48, n=4, judge_n=4, pgd_steps=2, eot=2, timing_n=4, timing_batch=32,
                 audit_inputs=16, audit_budget={"steps": 2, "eot_cap": 2, "queries": 5, "judge_n": 2})


def run_demo(run_dir, *, quick=False, epochs=None, seed=0, device="cpu", progress=True, dataset="digits"):
    """dataset: "digits" (the default, a few minutes) or "mnist-5k" (28x28: about 25 minutes on one
    CPU thread, most of it training)."""
    if dataset not in data.BUNDLED:
        raise ValueError(f"dataset must be one of {data.BUNDLED}, got {dataset!r}")
    s = dataclasses.replace(QUICK if quick else Settings(), **({"epochs": epochs} if epochs else {}))
    ds = data.load(dataset)  # recorded as the bundled set, so eval finds it again
    x, y = ds.x_test[:s.test_inputs].to(device), ds.y_test[:s.test_inputs].to(device)
    size = "x".join(map(str, ds.shape[1:]))
    print(f"noisekernels demo: {len(ds.y_train)} training and {len(x)} test {dataset} images ({size}), {s.epochs} epochs "
          f"per model, {torch.get_num_threads()} threads; runs in {run_dir}")
    trained, started = {}, time.perf_counter()
    for label, defense, arch, sizes, options in MODELS:
        config = TrainConfig(defense=defense, model=arch, model_options=sizes, options=options, epochs=s.epochs,
                             seed=seed, device=device, progress=progress and not quick)
        t0 = time.perf_counter()
        run = os.path.join(run_dir, label)
        trainer = Trainer(config, run, dataset=ds, resume=has_checkpoint(run))
        reused = trainer.epoch >= s.epochs
        trained[label] = (trainer.fit(), trainer.preset)
        print(f"  {label}: {'reused the trained model' if reused else f'trained in {time.perf_counter() - t0:.1f} s'}")
    print(f"training: {time.perf_counter() - started:.1f} s")

    pgd = {"steps": s.pgd_steps, "eot": s.eot, "alpha_ratio": 0.25}
    curves, robust_curves, results = {}, {}, {}
    for label, (model, preset) in trained.items():
        clean = evaluate.clean_accuracy(model, x, y, s.n)
        attacked = evaluate.robust_accuracy(model, x, y, "PGD", EPS, pgd, judge_n=s.judge_n, seed=seed)
        robust = attacked.robust
        curves[label] = evaluate.accuracy_vs_n(model, x, y, (1, 2, 5, 10, 20) if not quick else (1, 2, 4))
        robust_curves[label] = {0.0: attacked.clean, **robust}
        results[label] = {"defense": preset.name, "test_noise": preset.test_noise, "clean": clean, "robust": robust}
        print()
        print(f"{label} ({preset.name}: {preset.summary}; test-time noise {'on' if preset.test_noise else 'off'})")
        print(f"  clean accuracy: noise off {_pct(clean['noise_off'])}  single {_pct(clean['single'])}  "
              f"MC mean {_pct(clean['mean'])}  vote {_pct(clean['vote'])}   (n={s.n})")
        print("  PGD-EOT (L-inf, {} steps, alpha eps/4, EOT {}), judged by the MC mean over {} fresh passes: {}".format(
            s.pgd_steps, s.eot, s.judge_n, "  ".join(f"eps {e:g}: {_pct(robust[e])}" for e in EPS)))
    evaluate.plot(os.path.join(run_dir, "robust_accuracy.png"), robust_curves, "eps (L-inf; 0: clean)",
                  "robust accuracy", f"PGD-EOT on {dataset} ({len(y)} test inputs)",
                  settings={"steps": s.pgd_steps, "alpha": "eps/4", "EOT": s.eot,
                            "judged by": f"the MC mean over {s.judge_n} fresh passes", "seed": seed})
    evaluate.plot(os.path.join(run_dir, "accuracy_vs_n.png"), curves, "n (MC passes)", "accuracy",
                  f"MC mean prediction: accuracy against n ({len(y)} {dataset} test inputs)", settings={"seed": seed}, xlog=True)

    xt, yt = ds.x_test[:s.timing_batch].to(device), ds.y_test[:s.timing_batch].to(device)
    timing = {label: evaluate.engine_timing(model, xt, yt, s.timing_n) for label, (model, _) in trained.items()}
    print()
    print(evaluate.timing_table(timing, len(yt)))
    report = _audit(trained[AUDITED][0], ds, s, seed, device, run_dir)
    evaluate.write_json(os.path.join(run_dir, "demo.json"), {"settings": {**dataclasses.asdict(s), "dataset": dataset},
                                                             "results": results,
                                                             "timing": timing, "audit": report.to_json()})
    print(f"\nwrote {run_dir}/demo.json, robust_accuracy.png, accuracy_vs_n.png, audit.md and its plots; total "
          f"{time.perf_counter() - started:.1f} s")
    return results


def _audit(model, ds, s, seed, device, run_dir):
    """The checklist of noisekernels.audit on the AUDITED defense: printed, and written to audit.md
    with its plots."""
    x, y = ds.x_test[:s.audit_inputs].to(device), ds.y_test[:s.audit_inputs].to(device)
    start = time.perf_counter()
    report = audit(model, x, y, AUDIT_EPS, seed=seed, **s.audit_budget)
    report.write(run_dir, f"Audit of {AUDITED} (demo)")
    print(f"\naudit of {AUDITED} at L-inf eps {AUDIT_EPS:g} on {len(y)} inputs ({time.perf_counter() - start:.1f} s): "
          + ", ".join(f"{c.name} {c.verdict}" for c in report.checks))
    print(f"  robust accuracy {_pct(report.robust_accuracy)} (worst case {_pct(report.robust_accuracy_worst)})")
    return report


def _pct(v):
    return f"{100 * v:5.1f}%"
