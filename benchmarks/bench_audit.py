"""The default audit (noisekernels.audit: nine checks, every example judged 3 x MC-20) against
torchattacks' AutoAttack(version='rand') alone (APGD-CE and APGD-DLR, 10 steps, EOT 20, one
restart), on the same model object and inputs: the RSE and A2SNN presets of the demo, trained
briefly on the bundled digits, 200 test digits (full mode; 50 in quick) at L-inf eps 0.1. Paired
rounds: AutoAttack, then the audit, back to back in each round (2 rounds in full mode, 1 in quick).
Goals (full mode, CPU): the audit costs at most 3x AutoAttack on RSE (ratio >= 0.34) and at most 1x
on A2SNN (ratio >= 1.0), where the engine batches EOT. Recorded beside the ratio: the audit's
verdicts and robust accuracies, and AutoAttack's examples judged by the audit's pooled judgement."""

import functools
import statistics
import tempfile
import time

import pytest
from conftest import DEVICES, MODE, full_size_goal, needs_torchattacks, sync, torchattacks

from noisekernels import data, demo, ensemble
from noisekernels.audit import audit
from noisekernels.metrics import Proportion
from noisekernels.train import TrainConfig, Trainer

EPS, EPOCHS = 0.1, 5
GOALS = {"rse": 0.34, "a2snn": 1.0}  # AutoAttack's time / the audit's (0.34: at most 3x, rounded the strict way)


@functools.lru_cache(maxsize=None)
def _trained(label):
    """The demo's model of `label`, trained EPOCHS epochs on the digits (seed 0)."""
    _, defense, arch, sizes, options = next(m for m in demo.MODELS if m[0] == label)
    config = TrainConfig(defense=defense, model=arch, model_options=sizes, options=options, epochs=EPOCHS, seed=0,
                         progress=False)
    with tempfile.TemporaryDirectory() as run:
        return Trainer(config, run, dataset=data.load("digits")).fit().eval()


@needs_torchattacks
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", ["rse", "a2snn"])
def test_audit_against_autoattack(benchmark, label, device):
    model = _trained(label).to(device)
    ds = data.load("digits")
    x, y = ds.x_test[:MODE.attack_batch].to(device), ds.y_test[:MODE.attack_batch].to(device)
    autoattack = torchattacks.AutoAttack(model, eps=EPS, version="rand", seed=0)
    times, results = {"theirs": [], "ours": []}, {}

    def run_autoattack():  # pedantic's untimed setup: AutoAttack just before each timed audit
        start = time.perf_counter()
        results.setdefault("x_autoattack", autoattack(x, y))
        sync(device)
        times["theirs"].append(time.perf_counter() - start)

    def run_audit():
        start = time.perf_counter()
        results.setdefault("report", audit(model, x, y, EPS, seed=0))
        sync(device)
        times["ours"].append(time.perf_counter() - start)

    benchmark.group = f"audit-default-B{len(y)}-{label}-{device}"
    benchmark.extra_info["impl"] = "noisekernels"
    benchmark.pedantic(run_audit, setup=run_autoattack, rounds=MODE.zoo_attack_rounds, iterations=1)
    ratio = statistics.median(t / o for t, o in zip(times["theirs"], times["ours"]))
    report = results["report"]
    # AutoAttack's examples under one MC-60 judgement, as the audit pools its three MC-20s
    correct = ensemble.decide(ensemble.mc_predict(model, results["x_autoattack"], 60)) == y
    autoattack_robust = Proportion(int(correct.sum()), len(y))
    benchmark.extra_info["paired"] = {"torchattacks.AutoAttack(version='rand')": (ratio, full_size_goal(GOALS[label]))}
    benchmark.extra_info["note"] = (
        f"eps {EPS}: audit robust accuracy {report.robust_accuracy:.3f} (worst case "
        f"{report.robust_accuracy_worst:.3f}), EOT chosen {report.settings['eot_chosen']}, verdicts "
        + ", ".join(f"{c.name} {c.verdict}" for c in report.checks)
        + f"; AutoAttack's examples under an MC-60 judgement {autoattack_robust:.3f}; seconds per check "
        + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
