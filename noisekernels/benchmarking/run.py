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
# (the engine, driver and attack benchmarks train or attack models: quick and full modes, quick at
# smaller sizes).
SMOKE_FILES = ("bench_providers.py", "bench_scaling.py", "bench_memory.py")


def bench_files(mode):
    if not os.path.isdir(BENCHMARKS):
        raise FileNotFoundError(f"no benchmarks/ beside the package ({BENCHMARKS}): the suite runs from a "
                                "checkout of the repository")
    files = SMOKE_FILES if mode == "smoke" else sorted(f for f in os.listdir(BENCHMARKS)
                                                        if f.startswith("bench_") and f.endswith(".py"))
    return [os.path.join(BENCHMARKS, f) for f in files]


def run_suite(mode, json_path, *, command, select=None, quiet=True, files=None, timeout=None):
    """Runs the suite's files for `mode`, or the given files of benchmarks/ (only tests matching the
    pytest -k expression `select` if given), saving pytest-benchmark's JSON to json_path. Returns
    pytest's exit code; raises subprocess.TimeoutExpired after `timeout` seconds."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    # pytest-benchmark opens its JSON file when the run starts: a file of its own until the run passes, so
    # the committed JSON is neither truncated by a failed run nor counted as an uncommitted change in the
    # run's own record (git describe --dirty).
    partial = os.path.abspath(json_path) + ".partial"
    paths = bench_files(mode) if files is None else [os.path.join(BENCHMARKS, f) for f in files]
    args = [sys.executable, "-m", "pytest", *paths, "-p", "no:cacheprovider", "-o", "addopts=",
            f"--benchmark-json={partial}", "--benchmark-disable-gc", "-q" if quiet else "-v"]
    if select:
        args += ["-k", select]
    if mode == "smoke":
        args.append("--benchmark-columns=median")
    env = dict(os.environ, NK_BENCH_MODE=mode, NK_BENCH_COMMAND=command,
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    code = subprocess.run(args, cwd=REPO, env=env, timeout=timeout).returncode
    if code == 0:
        os.replace(partial, json_path)
    return code
