"""Side-by-side benchmarks: after pytest-benchmark's tables, prints for every group the ratio of
each baseline's median time to ours, and whether the goal stated by ours is met. The same run
measures both sides, so the ratios hold on a noisy shared machine where absolute times do not."""

import os
import statistics
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from noisekernels.benchmarking.harness import DEVICES, HAS_CUDA, MODE, MODE_NAME, full_size_goal, sync  # noqa: E402,F401

try:  # the attack baselines; an image without it (the GPU machine's) skips those comparisons, saying why
    import torchattacks
except ImportError:
    torchattacks = None
NO_TORCHATTACKS = "torchattacks is not installed, so the comparisons against it are skipped (docs/gpu-check.md: carry its wheel)"
needs_torchattacks = pytest.mark.skipif(torchattacks is None, reason=NO_TORCHATTACKS)


def paired_ratio(ours, baseline, rounds, sync=lambda: None):
    """Median over rounds of baseline time / ours time, the two run back to back in each round, so
    both see the same load on a shared machine (long runs drift far more than short ones). The
    order alternates between rounds: whichever runs second gains or loses a percent or two (caches,
    the allocator), which alternation cancels."""
    ratios = []
    for i in range(rounds):
        times = {}
        for name, fn in (("baseline", baseline), ("ours", ours))[::1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            sync()
            times[name] = time.perf_counter() - start
        ratios.append(times["baseline"] / times["ours"])
    return statistics.median(ratios)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The machine the report states: CPU model, cores, versions, the extension's build, the GPU."""
    from noisekernels.benchmarking import machine
    machine_info["noisekernels"] = machine.describe()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["noisekernels"] = {"mode": MODE_NAME, "command": os.environ.get("NK_BENCH_COMMAND", "pytest benchmarks")}


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    from noisekernels.benchmarking.compare import bench_file
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is not None:
            groups.setdefault((bench_file(bench.fullname), bench.group), []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("noisekernels ratios (baseline median / ours median; > 1 means ours is faster)")
    for (_file, group), benches in sorted(groups.items()):
        for mine in [b for b in benches if b.extra_info.get("ours")]:
            mine_t = statistics.median(mine.stats.data)
            goals = mine.extra_info.get("goals", {})
            for other in benches:
                if other is mine or other.extra_info.get("ours"):
                    continue
                ratio = statistics.median(other.stats.data) / mine_t
                impl = other.extra_info.get("impl", other.name)
                goal = goals.get(impl)
                status = "" if goal is None else f"  goal >= {goal}x: {'met' if ratio >= goal else 'MISSED'}"
                write(f"  {group}: {mine.extra_info.get('impl', mine.name)} vs {impl}: {ratio:.2f}x{status}")
        for bench in benches:
            for base, (ratio, goal) in bench.extra_info.get("paired", {}).items():
                status = "" if goal is None else f"  goal >= {goal}x: {'met' if ratio >= goal else 'MISSED'}"
                write(f"  {group}: {bench.extra_info.get('impl', bench.name)} vs {base} (paired rounds): {ratio:.2f}x{status}")
            if "peak_memory_mb" in bench.extra_info:
                loop = bench.extra_info.get("loop_peak_memory_mb")
                write(f"  {group}: {bench.extra_info.get('impl', bench.name)} peak memory "
                      f"{bench.extra_info['peak_memory_mb']} MiB" + ("" if loop is None else f" (loop {loop} MiB)"))
            if "note" in bench.extra_info:
                write(f"  {group}: {bench.extra_info['note']}")
            if "saved_bytes_per_element" in bench.extra_info:
                write(f"  {group}: {bench.extra_info.get('impl', bench.name)} saves "
                      f"{bench.extra_info['saved_bytes_per_element']:.4g} bytes per element for backward")
