"""The benchmark suite end to end at its smallest sizes (smoke mode, no timing assertions): every
provider agrees with the op's reference, the report and the plots are written; the agreement check
fails on a wrong provider; the comparison lists exactly the ratios that fell by more than 20%."""

import copy
import json
import sys

import pytest
import torch

from noisekernels import cli
from noisekernels.benchmarking import compare, harness, report
from noisekernels.benchmarking.run import BENCHMARKS

sys.path.insert(0, BENCHMARKS)
import bench_providers  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cli.main(["bench", "--mode", "smoke", "--out", str(out)])
    return out, compare.load(out / "docs" / "benchmarks" / "smoke.json")


def test_smoke_run_every_provider_agrees(smoke):
    _, run = smoke
    seen = {}
    for b in run["benchmarks"]:
        info = b["extra_info"]
        if info.get("section") == "providers":
            seen[(info["op"], info["mode"], info["impl"])] = info
    for name, op in bench_providers.OPS.items():
        for mode in op.modes:
            for impl in ("noisekernels", "eager", "compile", "copy-floor"):
                info = seen[(name, mode, impl)]  # every op, mode and provider ran
                if impl != "copy-floor":  # its result and gradients were checked against the reference
                    assert info["max_abs_diff"] <= op.atol, (name, mode, impl)
                    assert (info["max_abs_grad_diff"] is None) == ("forward+backward" not in op.modes)
    saved = {k[0]: v["saved_bytes_per_element"] for k, v in seen.items()
             if k[1:] == ("forward+backward", "noisekernels")}
    # 4096 elements here: random_spike saves its keep mask packed 8 per byte (eager: a bool mask, 1
    # byte per element), gaussian_add the 16-byte stream state, not the noise.
    assert saved["random_spike"] == 0.125 and saved["gaussian_add"] < 0.1


def test_smoke_run_writes_report_and_plots(smoke):
    out, run = smoke
    text = (out / "BENCHMARKS.md").read_text()
    for heading in ("## Headline ratios", "## Providers side by side", "## Scaling with tensor size",
                    "## Scaling with the number of replicas", "### Peak memory", "### Bytes saved for backward"):
        assert heading in text
    assert run["noisekernels"] == {"mode": "smoke", "command": "noisekernels bench --mode smoke"}
    assert "noisekernels bench --mode smoke" in text and run["machine_info"]["noisekernels"]["cpu"] in text
    for png in ("providers.png", "scaling_size.png", "scaling_replicas.png", "memory.png"):
        data = (out / "docs" / "benchmarks" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"docs/benchmarks/{png}" in text
    peaks = [b["extra_info"]["peak_memory_mb"] for b in run["benchmarks"] if b["extra_info"].get("section") == "memory"]
    # rs1's MC prediction, batched and loop: a peak of a few MiB at the smoke sizes, read from counters
    # that lag by up to 64 pages a thread (Linux's split RSS accounting), so a loaded machine reads
    # a little below 0
    assert len(peaks) == 2 and all(p > -1 for p in peaks)


def test_check_fails_on_a_wrong_provider(monkeypatch):
    op = bench_providers.OPS["random_spike"]
    wrong = bench_providers.Op(**{**op.__dict__, "composite": lambda t, d: torch.where(d[0] < 0.7, t[0], t[0] * 0)})
    monkeypatch.setitem(bench_providers.OPS, "random_spike", wrong)
    with pytest.raises(AssertionError, match="random_spike/eager: max"):
        bench_providers.check_agrees("random_spike", "eager", "cpu", 4096)
    wrong_grad = bench_providers.Op(**{**bench_providers.OPS["gaussian_add"].__dict__,
                                       "composite": lambda t, d: t[0] * 1.5 + 0.1 * d[0] - t[0].detach() * 0.5})
    monkeypatch.setitem(bench_providers.OPS, "gaussian_add", wrong_grad)
    with pytest.raises(AssertionError, match="gradient"):
        bench_providers.check_agrees("gaussian_add", "eager", "cpu", 4096)


def _bench(group, impl, median, ours=False, file="bench_x", **extra):
    return {"group": group, "name": f"{group}-{impl}", "fullname": f"benchmarks/{file}.py::test[{impl}]",
            "stats": {"median": median}, "extra_info": {"impl": impl, "ours": ours, **extra}}


def _run(eager, compile_, paired):
    return {"benchmarks": [
        _bench("spike-forward-cpu", "noisekernels", 1.0, ours=True), _bench("spike-forward-cpu", "eager", eager),
        _bench("spike-forward-cpu", "compile", compile_),
        _bench("spike-forward-cpu", "eager", 100.0, file="bench_y"),  # same group name, another file: apart
        _bench("mc-n50", "batched", 2.0, paired={"loop": [paired, 1.0]}),
        *(_bench("memory-x", impl, 9.0, section="memory", kind="mc_predict", defense="rs1", n=4, batch=8,
                 peak_memory_mb=mib) for impl, mib in (("batched", 3.5), ("loop", 1.5)))]}


def test_compare_lists_the_ratios_that_fell(tmp_path, capsys):
    old, new = _run(10.0, 4.0, 3.0), _run(7.9, 3.3, 2.5)  # eager -21%, compile -17.5%, paired -16.7%
    assert compare.ratios(old) == {"bench_x/spike-forward-cpu: noisekernels vs eager": 10.0,
                                   "bench_x/spike-forward-cpu: noisekernels vs compile": 4.0,
                                   "bench_x/mc-n50: batched vs loop (paired)": 3.0}
    assert compare.regressions(old, new) == [("bench_x/spike-forward-cpu: noisekernels vs eager", 10.0, 7.9)]
    worse = copy.deepcopy(new)
    worse["benchmarks"][4]["extra_info"]["paired"]["loop"][0] = 2.0
    assert [k for k, _, _ in compare.regressions(old, worse)] == ["bench_x/mc-n50: batched vs loop (paired)",
                                                                  "bench_x/spike-forward-cpu: noisekernels vs eager"]
    paths = []
    for name, run in (("old", old), ("new", new)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--compare", str(paths[1]), "--baseline", str(paths[0])])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "3 ratios in both runs; 1 fell by more than 20%" in out and "noisekernels vs eager: 10.00x -> 7.90x" in out
    cli.main(["bench", "--compare", str(paths[0]), "--baseline", str(paths[0])])  # no fall: exit 0
    with pytest.raises(ValueError, match="threshold"):
        compare.regressions(old, new, 1.5)


def test_sequential_certification_table_from_a_synthetic_run():
    sequential = {"radii": [0.0, 0.5], "inputs": 10, "accuracy_cohen": [0.9, 0.6], "accuracy_sequential": [0.9, 0.5],
                  "accuracy_largest": [0.8, 0.4], "samples_cohen": 1100.0, "samples_sequential": 150.0,
                  "samples_sequential_by_radius": [50.0, 100.0], "samples_largest": 700.0, "seconds_largest": 2.0,
                  "seconds_cohen": 4.0, "seconds_sequential": 0.5}
    oracle = {"certified": 9, "copies": 10, "samples": 321.0, "radius": 0.4, "seconds": 0.01}
    run = {"benchmarks": [_bench("seq", "sequential", 1.0, sequential=sequential),
                          _bench("oracle", "sequential", 1.0, sequential_oracle=oracle)],
           "noisekernels": {"mode": "full"}, "machine_info": {"noisekernels": {"torch_threads": 1}}}
    text = "\n".join(report._sequential_md(run))
    assert "| Cohen et al.'s CERTIFY, N = 100,000 | 90 | 60 | 1100 | 4.0 |" in text
    assert "| sequential, radius r (one run per r, 2 together) | 90 | 50 | 150 (50 + 100) | 0.5 |" in text
    assert "| sequential, largest radius (tolerance 0.05) | 80 | 40 | 700 | 2.0 |" in text
    assert "certified for 9 of 10 copies with 321 samples" in text and "mode full, torch threads 1" in text
    assert report._sequential_md(_run(10.0, 4.0, 3.0)) == []


def test_headline_and_report_from_a_synthetic_run(tmp_path):
    run = _run(10.0, 4.0, 3.0)
    for b, impl in zip(run["benchmarks"][:3], ("noisekernels", "eager", "compile")):
        b["extra_info"].update(section="providers", op="spike", mode="forward", device="cpu", numel=10, floor_bytes=120)
    run["benchmarks"].append(_bench("spike-forward-cpu", "copy-floor", 0.5, section="providers", op="spike",
                                    mode="forward", device="cpu", numel=10, floor_bytes=120))
    assert report.headline(run) == [("spike forward (cpu) vs eager", 10.0), ("spike forward (cpu) vs compile", 4.0),
                                    ("spike forward (cpu): copy floor / ours", 0.5),
                                    ("bench_x/mc-n50: batched vs loop (paired)", 3.0)]
    text = open(report.write_report(run, str(tmp_path))).read()
    assert "| bench_x/mc-n50: batched vs loop (paired) | 3.00x |" in text
    assert "| forward | cpu | eager | 1e+04 | 10.00x | 0.0 |  |  |" in text
    assert "| mc_predict | rs1 | 4 | 3.5 | 1.5 |" in text
    assert (tmp_path / "docs" / "benchmarks" / "providers.png").read_bytes()[:4] == b"\x89PNG"


def test_full_mode_attacks_every_zoo_model():
    import zoo

    assert harness.ZOO_MODELS == tuple(zoo.ZOO)
    assert harness.MODES["full"].zoo_attack_models == tuple(zoo.ZOO)
