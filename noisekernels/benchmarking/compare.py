"""The ratios of a run (baseline time / our time, > 1 where ours is faster; the same run measures
both sides, so ratios hold on a loaded machine where absolute times do not) and the comparison of
two runs: every ratio that fell by more than a threshold."""

import json
import os


def load(path):
    with open(path) as f:
        return json.load(f)


def _impl(bench):
    return bench["extra_info"].get("impl", bench["name"])


def bench_file(fullname):
    """The file of a benchmark's pytest id, without directory and suffix: groups of one name in two
    files (an op's providers at the mode's size, its goal benchmark at the issue's) stay apart."""
    return os.path.splitext(os.path.basename(fullname.split("::")[0]))[0]


def ratios(run):
    """{"group: ours vs other": ratio} for every group with one of ours (median times) and every
    paired-rounds ratio a benchmark recorded. Memory measurements (timed whole processes) have none."""
    groups = {}
    for bench in run["benchmarks"]:
        if bench["extra_info"].get("section") != "memory":
            groups.setdefault((bench_file(bench["fullname"]), bench["group"]), []).append(bench)
    out = {}
    for (file, group), benches in groups.items():
        group = f"{file}/{group}"
        for mine in [b for b in benches if b["extra_info"].get("ours")]:
            for other in benches:
                if other is not mine and not other["extra_info"].get("ours"):
                    out[f"{group}: {_impl(mine)} vs {_impl(other)}"] = other["stats"]["median"] / mine["stats"]["median"]
        for bench in benches:
            for base, (ratio, _goal) in bench["extra_info"].get("paired", {}).items():
                out[f"{group}: {_impl(bench)} vs {base} (paired)"] = ratio
    return out


def regressions(old, new, threshold=0.2):
    """[(key, old ratio, new ratio)] for every ratio of both runs that fell by more than
    `threshold` (a fraction of the old ratio), worst first."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    before, after = ratios(old), ratios(new)
    fell = [(k, before[k], after[k]) for k in sorted(before.keys() & after.keys())
            if after[k] < (1 - threshold) * before[k]]
    return sorted(fell, key=lambda r: r[2] / r[1])


def format_regressions(fell, old_name, new_name, threshold, compared):
    lines = [f"{compared} ratios in both runs; {len(fell)} fell by more than {threshold:.0%} "
             f"({old_name} -> {new_name}):"]
    lines += [f"  {k}: {a:.2f}x -> {b:.2f}x ({b / a - 1:+.0%})" for k, a, b in fell]
    return "\n".join(lines)
