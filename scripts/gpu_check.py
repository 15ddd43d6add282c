#!/usr/bin/env python3
"""`make gpu-check`: on a machine whose torch has CUDA, with no network, builds the extension's
CUDA kernels against the installed torch, runs the tests that skip without a GPU and the GPU
benchmarks, writes docs/benchmarks/gpu.json and the GPU section of BENCHMARKS.md, and prints a
summary (docs/gpu-check.md).

Nothing is installed: the build uses the torch, setuptools and ninja already there. Every step
has a time budget, enforced as its timeout, and the budgets add up to 8 minutes (--short: a rerun
that fits in the same lease). --dry-run runs the same steps on CPU at sizes that take seconds and
writes into a temporary folder (or --out), never over the committed report."""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # also its timeout
    short_budget_s: int
    tests: str = ""  # pytest -k expression over tests/ ({device} filled in)
    bench_files: tuple = ()  # benchmarks/ files run under pytest-benchmark
    bench_select: str = ""  # their pytest -k expression ({device} filled in)
    short_select: str = ""  # --short's expression, where it differs
    dry_select: str = ""  # --dry-run's expression, where it differs
    needs: str = ""  # a module the step needs beyond the project's


# The order they run in; a 16-core H100 machine's budgets. Kernels and torch.compile are apart so
# that a slow inductor compile cannot lose the kernels' figures. The report is rewritten after
# every step (a second or two, inside the steps' budgets).
STEPS = (
    Step("environment", 10, 10),
    Step("build", 150, 150),  # a few seconds where the extension is already built with CUDA for this torch
    # -k also matches file names: the CUDA emulation's tests (g++ builds, CPU only) are left out.
    # On CPU the dry run's tests are the CUDA ones, which skip: Triton's interpreter takes minutes.
    Step("tests", 85, 40, tests="(cuda or triton) and not emulat", short_select="cuda and not emulat",
         dry_select="cuda and not emulat"),
    Step("kernels", 60, 30, bench_files=("bench_providers.py",), bench_select="{device} and not compile",
         short_select="{device} and not compile and not backward", dry_select="{device} and not compile and not backward"),
    Step("compile", 60, 30, bench_files=("bench_providers.py",), bench_select="{device} and compile",
         short_select="{device} and compile and not backward", dry_select="{device} and compile and not backward"),
    Step("engine", 60, 30, bench_files=("bench_zoo.py",), bench_select="{device} and (mc_predict or eot_grad)",
         dry_select="{device} and mc_predict and rs1-cnn"),
    Step("attacks", 30, 30, bench_files=("bench_zoo.py",), bench_select="{device} and test_attack",
         short_select="{device} and test_attack and not autoattack",
         dry_select="{device} and test_attack and pgd and not apgd", needs="torchattacks"),
    Step("certify", 20, 15, bench_files=("bench_certify.py",), bench_select="{device}"),
)
TOTAL_BUDGET_S = sum(s.budget_s for s in STEPS)
SHORT_BUDGET_S = sum(s.short_budget_s for s in STEPS)
DRY_RUN_TIMEOUT_S = 300
assert TOTAL_BUDGET_S <= 8 * 60, "the issue's budget: a full run in at most 8 minutes on one H100"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="scripts/gpu_check.py")
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny sizes (no GPU needed)")
    p.add_argument("--short", action="store_true",
                   help=f"fewer tests, forward kernels only, fewer rounds: {SHORT_BUDGET_S} s instead of {TOTAL_BUDGET_S} s")
    p.add_argument("--out", help="where BENCHMARKS.md and docs/benchmarks/gpu.json go (default: the repository "
                                 "root; with --dry-run a new temporary folder)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="gpu-check-dry-run-") if args.dry_run else REPO
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is not a folder")
    return args


class Check:
    """One run: its mode, the steps' outcomes and what the report needs."""

    def __init__(self, args):
        self.dry_run, self.short, self.out = args.dry_run, args.short, args.out
        self.device = "cpu" if self.dry_run else "cuda"
        self.mode = "dry-run" if self.dry_run else "gpu-short" if self.short else "gpu"
        self.command = "make gpu-check" + " DRY_RUN=1" * self.dry_run + " SHORT=1" * self.short
        self.results, self.skipped, self.benchmarks = [], [], []
        self.machine_info, self.environment = {}, {}
        self.built = False
        self.work = tempfile.mkdtemp(prefix="gpu-check-")
        self.failed = tempfile.mkdtemp(prefix="gpu-check-record-")  # the record while nothing is built
        self.started = time.monotonic()
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")

    def budget(self, step):
        """The step's timeout: its budget on a GPU; on a shared CPU (the dry run) a bound that only
        stops a hung step."""
        if self.dry_run:
            return DRY_RUN_TIMEOUT_S
        return step.short_budget_s if self.short else step.budget_s

    def select(self, step, expression):
        if self.dry_run and step.dry_select:
            expression = step.dry_select
        elif self.short and step.short_select:
            expression = step.short_select
        return expression.format(device=self.device)


# ---------------------------------------------------------------- environment and build

def cuda_home():
    """The CUDA toolkit's folder: CUDA_HOME or CUDA_PATH, else the first of nvcc's grandparent
    folder and /usr/local/cuda that holds include/cuda_runtime.h (nvcc may be a wrapper script
    elsewhere, where torch's own guess fails)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    return next((c for c in candidates if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))), None)


def environment(check, step):
    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "triton": _version("triton"), "cuda_home": cuda_home(), "cpu_count": os.cpu_count()}
    check.environment = env
    if check.dry_run:
        env["device"] = f"CPU ({platform.machine()}, dry run)"
    else:
        env["device"] = "none"
        if torch.version.cuda is None or not torch.cuda.is_available():
            raise RuntimeError(f"no GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; on a "
                               "CPU-only machine run `make gpu-check DRY_RUN=1`")
        if env["cuda_home"] is None:
            raise RuntimeError("no CUDA toolkit: nvcc is not on the PATH and neither CUDA_HOME nor /usr/local/cuda "
                               "holds include/cuda_runtime.h")
        props = torch.cuda.get_device_properties(0)
        env["device"] = (f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                         f"{props.total_memory / 2**30:.0f} GiB)")
    return f"{env['device']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}"


def _version(module):
    return importlib.import_module(module).__version__ if importlib.util.find_spec(module) else None


def run_bounded(args, timeout, env=None):
    """Runs args in REPO, its output passed through, and returns (exit code, the output's last
    lines); at the timeout kills its whole process group (the build's compilers with it) and
    raises subprocess.TimeoutExpired."""
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    expired = threading.Event()

    def expire():
        expired.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, expire)
    timer.start()
    tail = []
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-20:]
        code = proc.wait()
    finally:
        timer.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(args, timeout)
    return code, tail


def extension_info():
    """The built extension's build_info in a fresh process, or None where it does not load (missing,
    stale: built from other sources or for another torch)."""
    code = "import json, noisekernels; print(json.dumps(noisekernels.build_info()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else None


def build(check, step):
    """Builds in place against the installed torch unless the built extension already loads with
    the kernels this run needs (CUDA ones unless dry). Never installs anything."""
    want_cuda = not check.dry_run
    info = extension_info()
    if info is not None and (info["cuda"] or not want_cuda):
        check.built, check.environment["built_with_cuda"] = True, info["cuda"]
        return f"up to date (torch {info['torch_version']}, CUDA kernels: {info['cuda']})"
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count()))
    if want_cuda:
        env["CUDA_HOME"] = check.environment["cuda_home"]
    code, tail = run_bounded([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], check.budget(step), env)
    if code != 0:
        raise RuntimeError(f"setup.py build_ext failed (exit code {code}): {tail[-1] if tail else 'no output'}")
    info = extension_info()
    if info is None:
        raise RuntimeError("the extension built but does not load (python -c 'import noisekernels' says why)")
    if want_cuda and not info["cuda"]:
        raise RuntimeError("the extension built without its CUDA kernels (setup.py: torch.version.cuda and CUDA_HOME "
                           "must both be set, NOISEKERNELS_NO_CUDA unset)")
    check.built, check.environment["built_with_cuda"] = True, info["cuda"]
    return f"built against torch {info['torch_version']}, CUDA kernels: {info['cuda']}"


# ---------------------------------------------------------------- tests and benchmarks

def tests(check, step):
    """The tests that skip without a GPU (on CPU, in the dry run: the same selection)."""
    args = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-k", check.select(step, step.tests)]
    code, tail = run_bounded(args, check.budget(step))
    summary = next((line for line in reversed(tail) if line), "no output")
    if code != 0:
        raise RuntimeError(f"pytest exit code {code}: {summary}")
    return summary


def benchmarks(check, step):
    from noisekernels.benchmarking import compare
    from noisekernels.benchmarking import run as suite
    if step.needs and importlib.util.find_spec(step.needs) is None:
        reason = f"{step.name}: {step.needs} is not installed, so the comparisons against it were skipped " \
                 "(docs/gpu-check.md: carry its wheel)"
        check.skipped.append(reason)
        return None
    json_path = os.path.join(check.work, f"{step.name}.json")
    code = suite.run_suite(check.mode, json_path, command=check.command, files=step.bench_files,
                           select=check.select(step, step.bench_select), timeout=check.budget(step))
    if code != 0:
        raise RuntimeError(f"pytest exit code {code}")
    run = compare.load(json_path)
    check.machine_info = check.machine_info or run["machine_info"]
    check.benchmarks += run["benchmarks"]
    return f"{len(run['benchmarks'])} benchmarks"


def report(check):
    """docs/benchmarks/gpu.json and BENCHMARKS.md's GPU section under --out (after every step, so an
    interrupted run keeps what it measured). Until the build has passed the record goes to a folder
    of its own instead: a run that stops at the environment check or the build (a CPU-only machine)
    must not replace a GPU run's figures."""
    path = os.path.join(check.out if check.built else check.failed, "docs", "benchmarks", "gpu.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    gpu = {"machine_info": check.machine_info, "benchmarks": check.benchmarks, "gpu_check": {
        "command": check.command, "mode": check.mode, "date": check.date, "commit": _commit(),
        "seconds": time.monotonic() - check.started, "budget_s": SHORT_BUDGET_S if check.short else TOTAL_BUDGET_S,
        "environment": check.environment, "steps": check.results, "skipped": check.skipped}}
    with open(path, "w") as f:
        json.dump(gpu, f, indent=1)
    if check.built:  # the report's code is the package's, which loads only once built
        from noisekernels.benchmarking.report import write_gpu_section
        write_gpu_section(check.out, gpu)
    return f"wrote {path}" + (f" and {os.path.join(check.out, 'BENCHMARKS.md')}" if check.built else "")


def _commit():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


# ---------------------------------------------------------------- the run

def action(step):
    if step.tests:
        return tests
    if step.bench_files:
        return benchmarks
    return {"environment": environment, "build": build}[step.name]


def run_step(check, step):
    start = time.monotonic()
    if any(r["status"] != "passed" for r in check.results if r["name"] in ("environment", "build")):
        status, detail = "not run", "the environment check or the build failed"
    else:
        try:
            detail = action(step)(check, step)
            status = "passed" if detail is not None else "skipped"
            detail = detail or check.skipped[-1]
        except subprocess.TimeoutExpired:
            status, detail = "timed out", f"stopped at its budget of {check.budget(step)} s"
        except RuntimeError as e:
            status, detail = "failed", str(e)
    check.results.append({"name": step.name, "status": status, "seconds": time.monotonic() - start,
                          "budget_s": check.budget(step), "detail": detail})
    print(f"gpu-check: {step.name}: {status} in {time.monotonic() - start:.0f} s "
          f"(budget {check.budget(step)} s): {detail}", flush=True)
    report(check)


def summary(check):
    lines = [f"gpu-check summary ({check.command}, {check.environment.get('device', '?')}), "
             f"{time.monotonic() - check.started:.0f} s of {SHORT_BUDGET_S if check.short else TOTAL_BUDGET_S} s:"]
    lines += [f"  {r['name']:<12} {r['status']:<10} {r['seconds']:6.0f} s / {r['budget_s']:>3} s  {r['detail']}"
              for r in check.results]
    copies = [b for b in check.benchmarks if b["extra_info"].get("section") == "device-copy"]
    for b in copies:
        lines.append(f"  device copy: {b['extra_info']['floor_bytes'] / b['stats']['median'] / 1e9:.3g} GB/s")
    lines.append(f"  wrote {os.path.join(check.out if check.built else check.failed, 'docs', 'benchmarks', 'gpu.json')}"
                 + (f" and the GPU section of {os.path.join(check.out, 'BENCHMARKS.md')}" if check.built else ""))
    return "\n".join(lines)


def main(argv=None):
    check = Check(parse_args(argv))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, REPO)
    for step in STEPS:
        run_step(check, step)
    print(summary(check), flush=True)
    shutil.rmtree(check.work, ignore_errors=True)
    return 0 if all(r["status"] in ("passed", "skipped") for r in check.results) else 1


if __name__ == "__main__":
    sys.exit(main())
