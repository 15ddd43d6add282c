"""Side-by-side benchmarks: after pytest-benchmark's tables, prints for every group the ratio of
each baseline's median time to ours, and whether the goal stated by ours is met. The same run
measures both sides, so the ratios hold on a noisy shared machine where absolute times do not."""

import os
import statistics

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is not None:
            groups.setdefault(bench.group, []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("noisekernels ratios (baseline median / ours median; > 1 means ours is faster)")
    for group, benches in sorted(groups.items()):
        ours = [b for b in benches if b.extra_info.get("ours")]
        if not ours:
            continue
        for mine in ours:
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
            if "saved_bytes_per_element" in bench.extra_info:
                write(f"  {group}: {bench.extra_info.get('impl', bench.name)} saves "
                      f"{bench.extra_info['saved_bytes_per_element']:.4g} bytes per element for backward")
