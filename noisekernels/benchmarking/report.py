"""BENCHMARKS.md and its PNG plots from one pytest-benchmark JSON run of the suite.

Times are medians over rounds; every ratio is between two providers of the same run (baseline
median / ours median, > 1 where ours is faster), which holds on a loaded machine where absolute
times drift. GB/s is the copy floor's bytes (the traffic no implementation avoids) over a
provider's time."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .compare import ratios  # noqa: E402

PROVIDER_ORDER = ("noisekernels", "noisekernels-cuda", "noisekernels-triton", "eager", "compile", "copy-floor")
MODES = ("forward", "backward", "forward+backward")


def _median(b):
    return b["stats"]["median"]


def _ms(seconds):
    return f"{seconds * 1e3:.3g}"


def _section(run, name):
    return [b for b in run["benchmarks"] if b["extra_info"].get("section") == name]


def _by(benches, *keys):
    out = {}
    for b in benches:
        out[tuple(b["extra_info"].get(k) for k in keys)] = b
    return out


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _gbs(b):
    nbytes = b["extra_info"].get("floor_bytes")
    return f"{nbytes / _median(b) / 1e9:.1f}" if nbytes else ""


# ---------------------------------------------------------------- providers

def _provider_rows(run):
    benches = _section(run, "providers")
    ops = list(dict.fromkeys(b["extra_info"]["op"] for b in benches))
    table = _by(benches, "op", "mode", "impl", "device")
    devices = list(dict.fromkeys(b["extra_info"]["device"] for b in benches))
    return ops, table, devices


def _providers_md(run):
    ops, table, devices = _provider_rows(run)
    if not ops:
        return []
    out = ["## Providers side by side", "",
           "Each op on the same tensor (`numel` elements, float32) in one run: this library's kernel "
           "(`noisekernels`, the dispatcher's choice for the device), the eager composite a user would write, "
           "`torch.compile` of that composite, and the copy floor (the memory traffic no implementation avoids: "
           "for Random Spiking a min/max pass plus a copy, for noise a copy, for the fills one write, for the "
           "reductions one read of the logits). *vs ours* is that provider's median time over ours (> 1: ours "
           "is faster; for the copy floor it is how close ours comes to the floor). *GB/s*: the floor's bytes over "
           "the provider's time. *saved B/elem*: bytes autograd keeps for backward per input element "
           "(saved_tensors_hooks). *max diff*: the largest difference from the op's reference on the contract's "
           "draws, of the output and (where differentiable) of the gradients against autograd through the "
           "reference (checked before timing on up to 65,536 elements; composites fed the same draws).", ""]
    for op in ops:
        rows = []
        for device in devices:
            for mode in MODES:
                ours = table.get((op, mode, "noisekernels", device))
                for impl in PROVIDER_ORDER:
                    b = table.get((op, mode, impl, device))
                    if b is None:
                        continue
                    info = b["extra_info"]
                    vs = "" if ours is None or b is ours else f"{_median(b) / _median(ours):.2f}x"
                    saved = info.get("saved_bytes_per_element")
                    diffs = [info.get(k) for k in ("max_abs_diff", "max_abs_grad_diff")]
                    rows.append([mode, device, impl, _ms(_median(b)), vs, _gbs(b),
                                 "" if saved is None else f"{saved:.3g}",
                                 " / ".join(f"{d:.1e}" for d in diffs if d is not None)])
        numel = next(b["extra_info"]["numel"] for b in table.values() if b["extra_info"]["op"] == op)
        out += [f"### {op} ({numel:,} elements)", "",
                _table(["mode", "device", "provider", "median ms", "vs ours", "GB/s", "saved B/elem", "max diff"],
                       rows), ""]
    return out


def _plot_providers(run, path):
    ops, table, devices = _provider_rows(run)
    device = devices[0]
    modes = [m for m in ("forward", "forward+backward") if any((op, m, "copy-floor", device) in table for op in ops)]
    if not modes:
        return False
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        names = [op for op in ops if (op, mode, "copy-floor", device) in table]
        impls = [i for i in PROVIDER_ORDER if i != "copy-floor" and any((op, mode, i, device) in table for op in names)]
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for j, op in enumerate(names):
                b = table.get((op, mode, impl, device))
                if b is not None:
                    xs.append(j + (k - (len(impls) - 1) / 2) * width)
                    ys.append(_median(b) / _median(table[(op, mode, "copy-floor", device)]))
            ax.bar(xs, ys, width, label=impl)
        ax.axhline(1.0, color="black", lw=0.8, ls="--", label="copy floor")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("time / copy floor")
        ax.set_title(f"{mode} on {device}: time relative to the copy floor (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- scaling

def _scaling_md(run, plot_dir):
    out = []
    sizes = _section(run, "scaling-size")
    if sizes:
        ops = list(dict.fromkeys(b["extra_info"]["op"] for b in sizes))
        table = _by(sizes, "op", "impl", "numel")
        rows = []
        for op in ops:
            for numel in sorted({b["extra_info"]["numel"] for b in sizes if b["extra_info"]["op"] == op}):
                ours, eager, floor = (table.get((op, i, numel)) for i in ("noisekernels", "eager", "copy-floor"))
                rows.append([op, f"{numel:.0e}", _ms(_median(ours)), _ms(_median(eager)), _ms(_median(floor)),
                             f"{_median(eager) / _median(ours):.2f}x", f"{_median(ours) / _median(floor):.2f}",
                             _gbs(ours), _gbs(floor)])
        out += ["## Scaling with tensor size", "",
                "Forward on a flat float32 tensor. Per element the cost is flat once launch overhead is amortised; "
                "GB/s falls where the tensor leaves the caches.", "",
                f"![time and GB/s against size]({plot_dir}/scaling_size.png)", "",
                _table(["op", "numel", "ours ms", "eager ms", "floor ms", "eager / ours", "ours / floor",
                        "ours GB/s", "floor GB/s"], rows), ""]
    reps = _section(run, "scaling-replicas")
    if reps:
        table = _by(reps, "impl", "n")
        ns = sorted({b["extra_info"]["n"] for b in reps})
        rows = [[n, _ms(_median(table[("batched", n)])), _ms(_median(table[("loop", n)])),
                 f"{_median(table[('loop', n)]) / _median(table[('batched', n)]):.2f}x"] for n in ns]
        batch = reps[0]["extra_info"]["batch"]
        out += ["## Scaling with the number of replicas", "",
                f"MC prediction (mean of softmax over n draws) of a small CNN with RSE's input and inner Gaussian "
                f"noise, batch {batch}: the batched engine (one pass over n*B rows) against the loop of n passes.", "",
                f"![time against n]({plot_dir}/scaling_replicas.png)", "",
                _table(["n", "batched ms", "loop ms", "loop / batched"], rows), ""]
    return out


def _plot_scaling(run, plot_dir):
    sizes = _section(run, "scaling-size")
    if sizes:
        ops = list(dict.fromkeys(b["extra_info"]["op"] for b in sizes))
        fig, axes = plt.subplots(2, len(ops), figsize=(5.5 * len(ops), 7), squeeze=False)
        for j, op in enumerate(ops):
            for impl in ("noisekernels", "eager", "copy-floor"):
                pts = sorted((b["extra_info"]["numel"], _median(b), b["extra_info"]["floor_bytes"]) for b in sizes
                             if b["extra_info"]["op"] == op and b["extra_info"]["impl"] == impl)
                axes[0, j].loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=impl)
                axes[1, j].semilogx([p[0] for p in pts], [p[2] / p[1] / 1e9 for p in pts], "o-", label=impl)
            axes[0, j].set_title(f"{op} forward")
            axes[0, j].set_ylabel("median ms")
            axes[1, j].set_ylabel("GB/s (copy floor's bytes / time)")
            axes[1, j].set_xlabel("elements")
            axes[0, j].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, "scaling_size.png"), dpi=110)
        plt.close(fig)
    reps = _section(run, "scaling-replicas")
    if reps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in ("batched", "loop"):
            pts = sorted((b["extra_info"]["n"], _median(b)) for b in reps if b["extra_info"]["impl"] == impl)
            ax.loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=impl)
        ax.set_xlabel("n replicas")
        ax.set_ylabel("median ms")
        ax.set_title("MC prediction: batched engine vs loop")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, "scaling_replicas.png"), dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------- memory

def _memory_rows(run):
    mem = _section(run, "memory")
    keys = list(dict.fromkeys((b["extra_info"]["kind"], b["extra_info"]["defense"], b["extra_info"]["n"]) for b in mem))
    table = _by(mem, "kind", "defense", "n", "impl")
    return keys, table


def _memory_md(run, plot_dir):
    out = []
    ops, table, devices = _provider_rows(run)
    rows = []
    for op in ops:
        cells = [table.get((op, "forward+backward", impl, devices[0])) for impl in ("noisekernels", "eager", "compile")]
        if any(c is not None and "saved_bytes_per_element" in c["extra_info"] for c in cells):
            rows.append([op] + ["" if c is None or "saved_bytes_per_element" not in c["extra_info"]
                                else f"{c['extra_info']['saved_bytes_per_element']:.3g}" for c in cells])
    if rows:
        out += ["## Memory", "", "### Bytes saved for backward, per input element", "",
                "What autograd keeps between forward and backward (saved_tensors_hooks; each storage once). "
                "The kernels regenerate their noise from (seed, offset) and save only the 16-byte stream "
                "state (and the learnable scale).", "",
                _table(["op", "noisekernels", "eager", "compile"], rows), ""]
    keys, mem = _memory_rows(run)
    if keys:
        batch = next(iter(mem.values()))["extra_info"]["batch"]
        rows = [[kind, defense, n, mem[(kind, defense, n, "batched")]["extra_info"]["peak_memory_mb"],
                 mem[(kind, defense, n, "loop")]["extra_info"]["peak_memory_mb"]] for kind, defense, n in keys]
        out += ["### Peak memory of the MC/EOT engine against the loop", "",
                f"One call on a batch of {batch} MNIST-sized inputs of an MNIST CNN with the defense's noise layers, "
                "each measured in a fresh process (peak resident memory above what was resident before the call, "
                "the kernel's VmHWM reset first; on a GPU torch's allocator peak), so memory an earlier "
                "measurement left with the allocator cannot hide a peak. The batched engine holds n replicas' "
                "activations at once (it chunks when asked); the loop holds one pass.", "",
                f"![peak memory]({plot_dir}/memory.png)", "",
                _table(["call", "defense", "n", "batched MiB", "loop MiB"], rows), ""]
    return out


def _plot_memory(run, path):
    keys, mem = _memory_rows(run)
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"{k}\n{d} n={n}" for k, d, n in keys]
    for k, impl in enumerate(("batched", "loop")):
        ax.bar([j + (k - 0.5) * 0.4 for j in range(len(keys))],
               [mem[key + (impl,)]["extra_info"]["peak_memory_mb"] for key in keys], 0.4, label=impl)
    ax.set_xticks(range(len(keys)), labels, fontsize=7)
    ax.set_ylabel("peak MiB above resident")
    ax.set_title("Peak memory of one call (fresh process each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- engines, drivers, attacks, goals

def _goal_status(ratio, goal):
    return "" if goal is None else f"goal >= {goal}x: {'met' if ratio >= goal else 'MISSED'}"


def _other_rows(run):
    """[group, impl, median ms, ratios and notes] of every benchmark outside the sections with tables of their own."""
    known = {"providers", "scaling-size", "scaling-replicas", "memory", "device-copy"}
    groups = {}
    for b in run["benchmarks"]:
        if b["extra_info"].get("section") not in known:
            groups.setdefault(b["group"], []).append(b)
    rows = []
    for group, benches in sorted(groups.items()):
        ours = [b for b in benches if b["extra_info"].get("ours")]
        for b in benches:
            info = b["extra_info"]
            cells = []
            for mine in ours:
                if b is not mine and not info.get("ours"):
                    r = _median(b) / _median(mine)
                    cells.append(f"{mine['extra_info'].get('impl', mine['name'])} is {r:.2f}x faster "
                                 f"{_goal_status(r, mine['extra_info'].get('goals', {}).get(info.get('impl')))}".strip())
            for base, (r, goal) in info.get("paired", {}).items():
                cells.append(f"{r:.2f}x faster than {base} (paired rounds) {_goal_status(r, goal)}".strip())
            if "peak_memory_mb" in info:
                loop = info.get("loop_peak_memory_mb")
                cells.append(f"peak {info['peak_memory_mb']} MiB" + ("" if loop is None else f" (loop {loop} MiB)"))
            if "note" in info:
                cells.append(info["note"])
            rows.append([group, info.get("impl", b["name"]), _ms(_median(b)), "; ".join(cells)])
    return rows


def _other_md(run):
    rows = _other_rows(run)
    if not rows:
        return []
    return ["## Engines, drivers, attacks and the per-op goals", "",
            "The engine against the loop of n passes, training steps against their eager twins, attacks against "
            "torchattacks, certification against the smoothing loop, and the per-op issue goals: each file of "
            "benchmarks/ that ran in this mode, as recorded (paired rounds: both sides back to back in each round; "
            "the group names give the sizes: quick mode runs the engine and attacks on fewer inputs than the full "
            "mode, whose sizes are the issues').", "", _table(["group", "impl", "median ms", "ratios and notes"], rows), ""]


def _sequential_md(run):
    """bench_certify_sequential's table: certified accuracy, samples and time of both methods."""
    [main] = [b["extra_info"]["sequential"] for b in run["benchmarks"] if "sequential" in b["extra_info"]] or [None]
    if main is None:
        return []
    radii = main["radii"]

    def pct(values):
        return [f"{100 * v:.0f}" for v in values]

    rows = [["Cohen et al.'s CERTIFY, N = 100,000", *pct(main["accuracy_cohen"]), f"{main['samples_cohen']:.0f}",
             f"{main['seconds_cohen']:.1f}"],
            [f"sequential, radius r (one run per r, {len(radii)} together)", *pct(main["accuracy_sequential"]),
             f"{main['samples_sequential']:.0f} (" + " + ".join(f"{v:.0f}" for v in main["samples_sequential_by_radius"])
             + ")", f"{main['seconds_sequential']:.1f}"],
            ["sequential, largest radius (tolerance 0.05)", *pct(main["accuracy_largest"]), f"{main['samples_largest']:.0f}",
             f"{main['seconds_largest']:.1f}"]]
    lines = ["## Sequential certification against CERTIFY", "",
             "benchmarks/bench_certify_sequential.py: an MLP trained with Gaussian augmentation on the bundled digits, "
             f"its first {main['inputs']} test digits, sigma 0.25, alpha 0.001, n0 100, n_max 100,000 (samples per input "
             f"include the n0 selection ones; seconds: the faster of two paired rounds; mode {run['noisekernels']['mode']}, "
             f"torch threads {run['machine_info']['noisekernels']['torch_threads']}).", "",
             _table(["method", *(f"certified % at r={r:g}" for r in radii), "samples per input", "seconds"], rows), ""]
    for b in run["benchmarks"]:
        oracle = b["extra_info"].get("sequential_oracle")
        if oracle:
            lines += [f"Linear oracle far from the boundary (pA = 0.999): radius D/2 = {oracle['radius']:.3f} certified "
                      f"for {oracle['certified']} of {oracle['copies']} copies with {oracle['samples']:.0f} samples on "
                      f"average, in {oracle['seconds']:.3f} s.", ""]
    return lines


# ---------------------------------------------------------------- headline and the whole report

def headline(run):
    """[(what, ratio)]: per op its main mode against eager and compile, and every paired ratio."""
    ops, table, devices = _provider_rows(run)
    out = []
    for device in devices:
        for op in ops:
            mode = "forward+backward" if (op, "forward+backward", "noisekernels", device) in table else "forward"
            ours = table.get((op, mode, "noisekernels", device))
            if ours is None:
                continue
            for impl in ("eager", "compile"):
                b = table.get((op, mode, impl, device))
                if b is not None:
                    out.append((f"{op} {mode} ({device}) vs {impl}", _median(b) / _median(ours)))
            floor = table.get((op, mode, "copy-floor", device))
            if floor is not None:
                out.append((f"{op} {mode} ({device}): copy floor / ours", _median(floor) / _median(ours)))
    out += [(k, v) for k, v in ratios(run).items() if k.endswith("(paired)")]
    return out


def _machine_md(run):
    m = run.get("machine_info", {}).get("noisekernels", {})
    meta = run.get("noisekernels", {})
    build = m.get("build", {})
    gpu = m.get("gpu")
    lines = [f"- Produced by `{meta.get('command', '?')}` (mode **{meta.get('mode', '?')}**) on "
             f"{run.get('datetime', '?')[:19].replace('T', ' ')} UTC, commit {run.get('commit_info', {}).get('id', '?')[:10]}"
             f"{' (uncommitted changes)' if run.get('commit_info', {}).get('dirty') else ''}.",
             f"- CPU: {m.get('cpu', '?')}, {m.get('cores', '?')} cores visible, torch threads {m.get('torch_threads', '?')}; "
             f"torch {m.get('torch', '?')}, triton {m.get('triton')}, numpy {m.get('numpy')}, Python {m.get('python')}; "
             f"extension built {'with' if build.get('avx512') else 'without'} AVX-512, CUDA {build.get('cuda')}; "
             f"load average at the start {', '.join(f'{v:.1f}' for v in m.get('load_average', ()))} "
             "(a shared machine: absolute times drift, ratios of one run less so).",
             *([f"- **The load average was above the {m.get('cores')} cores**: the process was descheduled "
                "during rounds, so unpaired medians (providers, scaling) carry large outliers (a 1e5-element op "
                "slower than a 1e6 one, a loop of one pass slower than the batched pass); the paired-rounds ratios "
                "(both sides back to back in each round) are the reliable figures of this run. Rerun on an idle "
                "machine for the tables."]
               if m.get("load_average") and m.get("cores") and m["load_average"][0] > m["cores"] else []),
             f"- GPU: {gpu}." if gpu else
             "- GPU: none on this machine, so the CUDA and Triton kernels and the achieved GB/s against a GPU's "
             "bandwidth were not measured; the same command on a GPU machine adds them (providers "
             "`noisekernels-cuda`, `noisekernels-triton`, GB/s beside the device's copy floor)."]
    return lines


# ---------------------------------------------------------------- the GPU section (scripts/gpu_check.py)

GPU_BEGIN, GPU_END = "<!-- gpu-check: begin -->", "<!-- gpu-check: end -->"
KERNEL_PROVIDERS = ("noisekernels", "noisekernels-cuda", "noisekernels-triton")


def _gbs_of(b):
    return b["extra_info"]["floor_bytes"] / _median(b) / 1e9


def _gpu_kernels_md(run):
    copies = {b["extra_info"]["device"]: _gbs_of(b) for b in _section(run, "device-copy")}
    ops, table, devices = _provider_rows(run)
    rows = []
    for device in devices:
        for op in ops:
            for mode in MODES:
                eager, compiled = table.get((op, mode, "eager", device)), table.get((op, mode, "compile", device))
                for impl in KERNEL_PROVIDERS:
                    b = table.get((op, mode, impl, device))
                    if b is None:
                        continue
                    gbs = _gbs_of(b)
                    rows.append([op, mode, device, impl, _ms(_median(b)), f"{gbs:.3g}",
                                 f"{gbs / copies[device]:.0%}" if device in copies else "",
                                 *(f"{_median(other) / _median(b):.2f}x" if other else "" for other in (eager, compiled))])
    copy_line = "; ".join(f"{d}: {gbs:.3g} GB/s" for d, gbs in copies.items()) or "not measured"
    return [f"Device-to-device copy in this run (bytes read and written over time): {copy_line}. Each kernel's "
            "*GB/s* is the op's unavoidable traffic (the copy floor's bytes) over its median time; *of copy* is that "
            "over the copy's GB/s; *vs eager* and *vs compile* are those providers' median times over the kernel's "
            "(> 1: the kernel is faster).", "",
            _table(["op", "mode", "device", "kernel", "median ms", "GB/s", "of copy", "vs eager", "vs compile"], rows)]


def gpu_section_md(gpu):
    """The GPU section of BENCHMARKS.md from gpu_check.py's JSON: the run, its steps, the kernels'
    bandwidth and the engine, attack and certification ratios."""
    check = gpu["gpu_check"]
    env = check["environment"]
    steps = [[s["name"], s["status"], f"{s['seconds']:.0f}", s["budget_s"]] for s in check["steps"]]
    lines = [GPU_BEGIN, "## GPU (make gpu-check)", "",
             f"- Produced by `{check['command']}` on {check['date']} UTC, commit {check.get('commit', '?')}, "
             f"in {check['seconds']:.0f} s (budget {check['budget_s']} s).",
             f"- Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"Python {env['python']}; extension built with CUDA kernels: {env.get('built_with_cuda')}.", "",
             _table(["step", "status", "seconds", "budget s"], steps), ""]
    lines += [f"- Skipped: {reason}" for reason in check["skipped"]] + ([""] if check["skipped"] else [])
    if _section(gpu, "providers"):
        lines += ["### Kernels against the device's bandwidth", ""] + _gpu_kernels_md(gpu) + [""]
    rows = _other_rows(gpu)
    if rows:
        lines += ["### The engine, attacks and certification", "",
                  _table(["group", "impl", "median ms", "ratios and notes"], rows), ""]
    return "\n".join(lines + [GPU_END])


def _gpu_section_of(text):
    start, end = text.find(GPU_BEGIN), text.find(GPU_END)
    return text[start:end + len(GPU_END)] if start >= 0 and end > start else None


def write_gpu_section(out_dir, gpu):
    """Puts the GPU section of `gpu` into out_dir/BENCHMARKS.md, in place of the one there or after
    the rest (a new file holds the section alone); returns the report's path."""
    path = os.path.join(out_dir, "BENCHMARKS.md")
    text = open(path).read() if os.path.exists(path) else ""
    old, section = _gpu_section_of(text), gpu_section_md(gpu)
    text = text.replace(old, section) if old else (text.rstrip("\n") + "\n\n" if text else "") + section + "\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def write_report(run, out_dir, plot_subdir="docs/benchmarks"):
    """Writes out_dir/BENCHMARKS.md (keeping the GPU section of the one there) and its PNG plots under
    out_dir/plot_subdir; returns the report's path."""
    plot_dir = os.path.join(out_dir, plot_subdir)
    os.makedirs(plot_dir, exist_ok=True)
    providers_plot = _section(run, "providers") and _plot_providers(run, os.path.join(plot_dir, "providers.png"))
    _plot_scaling(run, plot_dir)
    _plot_memory(run, os.path.join(plot_dir, "memory.png"))
    head = headline(run)
    lines = ["# noisekernels benchmarks", "",
             "Generated by `noisekernels bench` (noisekernels/benchmarking/) from the pytest-benchmark JSON beside the "
             "plots; do not edit by hand. Times are medians; every ratio compares two providers of the same run.", ""]
    lines += _machine_md(run) + [""]
    if head:
        lines += ["## Headline ratios", "", "> 1 means this library is faster (for the copy floor: 1 is the floor).", "",
                  _table(["comparison", "ratio"], [[k, f"{v:.2f}x"] for k, v in head]), ""]
    if providers_plot:
        lines += [f"![providers against the copy floor]({plot_subdir}/providers.png)", ""]
    lines += _providers_md(run) + _scaling_md(run, plot_subdir) + _memory_md(run, plot_subdir) + _other_md(run)
    lines += _sequential_md(run)
    lines += ["## Reproduce and compare", "",
              "```", "make bench                                   # quick mode (noisekernels bench)",
              "noisekernels bench --mode full               # full sizes and rounds",
              "noisekernels bench --compare NEW.json        # ratios that fell > 20% against the committed baseline",
              "noisekernels bench --compare NEW.json --baseline OLD.json", "```", ""]
    path = os.path.join(out_dir, "BENCHMARKS.md")
    gpu = _gpu_section_of(open(path).read()) if os.path.exists(path) else None  # gpu_check.py's, kept
    with open(path, "w") as f:
        f.write("\n".join(lines + ([gpu, ""] if gpu else [])))
    return path
