"""Runs the benchmark suite (benchmarks/ of the repository) under pytest-benchmark in one mode.

Modes (sizes and rounds in benchmarks/conftest.py): smoke (the smallest sizes, one round: the
test suite's check that every provider agrees and the report is produced), quick (the default, a
few minutes on 2 CPU cores) and full."""

import os
import subprocess
import sys

from .harness import MODES
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# What the smoke run covers: the providers of every op, the scaling and the memory measurements
# (the engine, driver and attack benchmarks train or attack models: quick and full modes only).
SMOKE_FILES = ("bench_providers.py", "bench_scaling.py", "bench_memory.py")
# Quick mode runs every file but each attack benchmark (minutes per defense on 2 cores) on one
# defense per goal: PGD on RS-1 and A2SNN, APGD on RS-1; full mode runs them all.
QUICK_SELECT = "not ((test_eot_pgd and rse) or (test_apgd_eot and (rse or a2snn)))"


def bench_files(mode):
    if not os.path.isdir(BENCHMARKS):
        raise FileNotFoundError(f"no benchmarks/ beside the package ({BENCHMARKS}): the suite runs from a "
                                "checkout of the repository")
    if mode == "smoke":
        return [os.path.join(BENCHMARKS, f) for f in SMOKE_FILES]
    return sorted(os.path.join(BENCHMARKS, f) for f in os.listdir(BENCHMARKS) if f.startswith("bench_") and f.endswith(".py"))


def run_suite(mode, json_path, *, command, select=None, quiet=True):
    """Runs the suite's files for `mode` (only tests matching the pytest -k expression `select`
    if given), saving pytest-benchmark's JSON to json_path. Returns pytest's exit code."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    args = [sys.executable, "-m", "pytest", *bench_files(mode), "-p", "no:cacheprovider", "-o", "addopts=",
            f"--benchmark-json={os.path.abspath(json_path)}", "--benchmark-disable-gc", "-q" if quiet else "-v"]
    selects = [f"({e})" for e in (QUICK_SELECT if mode == "quick" else None, select) if e]
    if selects:
        args += ["-k", " and ".join(selects)]
    if mode == "smoke":
        args.append("--benchmark-columns=median")
    env = dict(os.environ, NK_BENCH_MODE=mode, NK_BENCH_COMMAND=command,
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.run(args, cwd=REPO, env=env).returncode
