"""The main job: `noisekernels demo --quick` end to end (the full demo is marked slow)."""

import json

import pytest

from noisekernels import cli
from noisekernels.demo import AUDITED, EPS, MODELS


def check(run, out, n_models=len(MODELS)):
    assert out.count("clean accuracy: noise off") == n_models
    assert "MC/EOT engine against the loop" in out
    report = json.loads((run / "demo.json").read_text())
    assert set(report["results"]) == {m[0] for m in MODELS}
    for label, r in report["results"].items():
        assert set(r["clean"]) == {"noise_off", "single", "mean", "vote"}
        assert set(r["robust"]) == {str(e) for e in EPS}
        assert all(0 <= v <= 1 for v in [*r["clean"].values(), *r["robust"].values()])
    # the paper's test-time noise is on for the stochastic defenses, off for the others
    assert {k: r["test_noise"] for k, r in report["results"].items()} == {
        "standard": False, "rs1": True, "rse": True, "a2snn": True, "pni-adv": True, "gda-brelu": False}
    timing = report["timing"]
    assert timing["a2snn"]["plan"].startswith("MC shared") and timing["pni-adv"]["plan"] == "MC loop, EOT loop"
    # no noise at test time: one pass, not a "speed-up" over a loop of identical passes
    assert [k for k, t in timing.items() if not t["noise"]] == ["standard", "gda-brelu"]
    for name in ("robust_accuracy.png", "accuracy_vs_n.png", "audit_eot.png", "audit_steps.png"):
        assert (run / name).stat().st_size > 1000
    # it ends by auditing one defense: nine checks, the worst-case figure never above the pooled one
    audit = report["audit"]
    assert len(audit["checks"]) == 9 and f"# Audit of {AUDITED}" in (run / "audit.md").read_text()
    assert audit["robust_accuracy_worst"]["count"] <= audit["robust_accuracy"]["count"]
    assert audit["checks"][0]["numbers"]["protocol"].startswith("randomized")
    return report


def test_demo_quick(tmp_path, capsys, threads):
    threads(1)
    cli.main(["demo", "--quick", "--run-dir", str(tmp_path)])
    check(tmp_path, capsys.readouterr().out)


@pytest.mark.slow
def test_demo_full(tmp_path, capsys):
    cli.main(["demo", "--run-dir", str(tmp_path)])
    report = check(tmp_path, capsys.readouterr().out)
    # trained models are far above chance on the clean digits
    assert all(r["clean"]["mean"] > 0.8 for r in report["results"].values())
