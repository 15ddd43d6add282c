"""scripts/gpu_check.py (make gpu-check): its dry run goes through every step on CPU and writes the
report into a temporary folder; without a GPU the real run stops at the environment check and runs
nothing after it; the GPU section of BENCHMARKS.md replaces its old self and survives the CPU
report's rewrite; the CUDA toolkit is found behind a wrapper nvcc. Slow: `pip install
--no-build-isolation .` into a fresh venv (setuptools 65.5) and the installed package used from
outside the repository."""

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

from noisekernels.benchmarking import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402


def _run_script(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    committed = os.path.join(ROOT, "docs", "benchmarks", "gpu.json")
    before = os.stat(committed).st_mtime_ns if os.path.exists(committed) else None
    r = _run_script("--dry-run", "--out", str(out))
    assert (os.stat(committed).st_mtime_ns if os.path.exists(committed) else None) == before  # never written
    return r, out, json.loads((out / "docs" / "benchmarks" / "gpu.json").read_text())


def test_dry_run_passes_every_step(dry_run):
    r, out, gpu = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = {s["name"]: s for s in gpu["gpu_check"]["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    have_torchattacks = gpu_check.importlib.util.find_spec("torchattacks") is not None
    for name, s in steps.items():
        expected = "skipped" if name == "attacks" and not have_torchattacks else "passed"
        assert s["status"] == expected, (name, s)
        assert s["seconds"] <= s["budget_s"]
    assert steps["tests"]["detail"].endswith("s") and "passed" in steps["tests"]["detail"]
    assert gpu["gpu_check"]["environment"]["device"].startswith("CPU")
    assert "gpu-check summary (make gpu-check DRY_RUN=1" in r.stdout


def test_dry_run_measures_every_kernel_and_the_drivers(dry_run):
    _, _, gpu = dry_run
    seen = {(b["extra_info"].get("op"), b["extra_info"].get("mode"), b["extra_info"]["impl"])
            for b in gpu["benchmarks"] if b["extra_info"].get("section") == "providers"}
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_providers
    for name in bench_providers.OPS:  # the dry run times the forward mode (the GPU run every mode)
        assert {(name, "forward", impl) for impl in ("noisekernels", "eager", "compile", "copy-floor")} <= seen
    assert all(b["extra_info"]["device"] == "cpu" for b in gpu["benchmarks"] if "device" in b["extra_info"])
    groups = [b["group"] for b in gpu["benchmarks"]]
    assert "device-copy-cpu" in groups
    for prefix in ("zoo-mc_predict-n50-B4-", "certify-sample-N1000-"):
        assert any(g.startswith(prefix) for g in groups), prefix


def test_dry_run_report_states_bandwidth_fractions(dry_run):
    _, out, gpu = dry_run
    text = (out / "BENCHMARKS.md").read_text()
    assert text.startswith(report.GPU_BEGIN) and text.rstrip().endswith(report.GPU_END)
    for s in gpu["gpu_check"]["steps"]:
        assert f"| {s['name']} | {s['status']} |" in text
    bench = {b["group"]: b for b in gpu["benchmarks"]}
    copy = bench["device-copy-cpu"]
    copy_gbs = copy["extra_info"]["floor_bytes"] / copy["stats"]["median"] / 1e9
    ours = next(b for b in gpu["benchmarks"] if b["extra_info"].get("op") == "gaussian_add"
                and b["extra_info"]["mode"] == "forward" and b["extra_info"]["impl"] == "noisekernels")
    gbs = ours["extra_info"]["floor_bytes"] / ours["stats"]["median"] / 1e9
    row = next(line for line in text.splitlines() if line.startswith("| gaussian_add | forward | cpu | noisekernels |"))
    assert row.split(" | ")[5:7] == [f"{gbs:.3g}", f"{gbs / copy_gbs:.0%}"]


def test_without_a_gpu_the_run_stops_at_the_environment_check_and_keeps_the_old_record(tmp_path):
    old = tmp_path / "docs" / "benchmarks" / "gpu.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"a GPU run": "its figures"}')
    r = _run_script("--out", str(tmp_path), timeout=120)
    assert r.returncode == 1
    assert old.read_text() == '{"a GPU run": "its figures"}'  # a failed environment check replaces nothing
    written = r.stdout.split("  wrote ")[-1].strip()
    steps = json.loads(open(written).read())["gpu_check"]["steps"]
    assert steps[0]["status"] == "failed" and "make gpu-check DRY_RUN=1" in steps[0]["detail"]
    assert {s["status"] for s in steps[1:]} == {"not run"}
    assert not (tmp_path / "BENCHMARKS.md").exists()  # nothing was measured


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    r = _run_script("--dry-run", "--out", str(tmp_path / "file"), timeout=60)
    assert r.returncode == 2 and f"--out '{tmp_path / 'file'}' is not a folder" in r.stderr


def _section(gpu_date):
    steps = [{"name": "build", "status": "passed", "seconds": 3.0, "budget_s": 150, "detail": ""}]
    return {"machine_info": {}, "benchmarks": [], "gpu_check": {
        "command": "make gpu-check", "date": gpu_date, "seconds": 3.0, "budget_s": 475, "skipped": ["x: y"],
        "steps": steps, "environment": {"device": "GPU", "torch": "2.11", "cuda": "13.0", "triton": "3.6",
                                        "python": "3.12"}}}


def test_gpu_section_replaces_its_old_self_and_survives_the_cpu_report(tmp_path):
    (tmp_path / "BENCHMARKS.md").write_text("# CPU report\n\ntext\n")
    report.write_gpu_section(tmp_path, _section("2026-01-01"))
    report.write_gpu_section(tmp_path, _section("2026-02-02"))
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.startswith("# CPU report\n\ntext\n\n" + report.GPU_BEGIN)
    assert text.count(report.GPU_BEGIN) == 1 and "2026-02-02" in text and "2026-01-01" not in text
    assert "- Skipped: x: y" in text and "| build | passed | 3 | 150 |" in text
    report.write_report({"benchmarks": []}, tmp_path)  # the CPU report, rewritten by `noisekernels bench`
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.startswith("# noisekernels benchmarks") and report.gpu_section_md(_section("2026-02-02")) in text


def test_cuda_home_is_found_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    toolkit, bin_dir = tmp_path / "cuda-13.0", tmp_path / "bin"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")  # /usr/local/bin/nvcc's kind
    (bin_dir / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert gpu_check.cuda_home() == str(toolkit)
    monkeypatch.delenv("CUDA_HOME")  # nvcc's grandparent (tmp_path) has no headers: /usr/local/cuda or none
    expected = "/usr/local/cuda" if os.path.isfile("/usr/local/cuda/include/cuda_runtime.h") else None
    assert gpu_check.cuda_home() == expected
    (bin_dir / "nvcc").unlink()
    (toolkit / "bin").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    (bin_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")  # a link is followed to the toolkit
    assert gpu_check.cuda_home() == str(toolkit)


@pytest.mark.slow
def test_pip_install_no_build_isolation_with_old_setuptools(tmp_path):
    """A fresh venv of this Python (setuptools 65.5, no wheel) that sees this environment's torch:
    the install says what to run first; with setuptools >= 70.1 (here: the venv's own old one
    removed, so the system's newer one is used) it installs, and the package works from outside the
    repository. About 3 minutes on 2 cores (the extension is compiled)."""
    env_dir, src = tmp_path / "venv", tmp_path / "src"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = str(env_dir / "bin" / "python")
    old = subprocess.run([py, "-c", "import setuptools; print(setuptools.__version__)"], capture_output=True, text=True)
    if tuple(int(p) for p in old.stdout.split(".")[:2]) >= (70, 1):
        pytest.skip(f"this Python's venv comes with setuptools {old.stdout.strip()}, which builds wheels")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for f in filter(None, files.split("\0")):  # the tracked sources, not this checkout's build
        os.makedirs(os.path.dirname(src / f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    install = [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", str(src)]
    r = subprocess.run(install, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "python -m pip install wheel" in r.stdout + r.stderr
    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    r = subprocess.run(install, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A noise layer of the installed package, its compiled kernel against the reference ops
    # (NOISEKERNELS_BACKEND=reference) on the same stream.
    code = ("import sys, torch, noisekernels as nk\n"
            "assert nk.__file__.startswith(sys.argv[1]), nk.__file__\n"
            "print(nk.build_info()['reference_only'], nk.nn.GaussianNoise(0.5, seed=7)(torch.zeros(1000)).tolist())\n")
    outputs = []
    for backend in ("auto", "reference"):
        r = subprocess.run([py, "-c", code, str(env_dir)], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "NOISEKERNELS_BACKEND": backend, "PYTHONPATH": ""})
        assert r.returncode == 0, r.stderr
        reference_only, values = r.stdout.split(" ", 1)
        assert reference_only == str(backend == "reference")
        outputs.append(torch.tensor(json.loads(values)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)  # normals: a few ulp apart
    assert 0.4 < outputs[0].std().item() < 0.6
    r = subprocess.run([str(env_dir / "bin" / "noisekernels"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and "train" in r.stdout and "certify" in r.stdout
