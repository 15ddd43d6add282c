"""Peak memory of the MC/EOT engine against the loop of n passes (issue 14), per defense, each
measured in a fresh process so that memory a previous measurement left with the allocator cannot
hide a peak: the process builds the model and plans it, resets the kernel's peak-RSS counter
(/proc/self/clear_refs) or, on a GPU, torch's allocator peak, runs the call once and reports the
peak above what was resident before. (Bytes saved for backward per element are measured per op
in bench_providers, forward+backward mode.)"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from noisekernels.benchmarking.harness import DEVICES, MODE  # noqa: E402

N_EOT = 20


def _status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def measure(defense, kind, impl, n, batch, device):
    """Runs in the fresh process: peak MiB of one call above the memory resident before it."""
    import torch
    from bench_ensemble import Net
    from torch import nn

    from noisekernels import ensemble

    torch.manual_seed(0)
    model = Net(defense).to(device).eval()
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if kind == "mc_predict":
        batched = lambda: ensemble.mc_predict(model, x, n)  # noqa: E731

        @torch.no_grad()
        def loop():
            return torch.stack([torch.softmax(model(x), -1) for _ in range(n)]).mean(0)
    else:
        batched = lambda: ensemble.eot_grad(model, nn.functional.cross_entropy, x, y, n)  # noqa: E731

        def loop():
            xi = x.clone().requires_grad_()
            total = sum(nn.functional.cross_entropy(model(xi), y) / n for _ in range(n))
            return torch.autograd.grad(total, xi)[0]
    ensemble.plan(model, x, n, grad=kind != "mc_predict")  # tuned once; not part of a call's footprint
    fn = batched if impl == "batched" else loop
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _status_mib("VmRSS:")
    fn()
    return _status_mib("VmHWM:") - before


def peak_in_fresh_process(*args):
    path = os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, __file__, json.dumps(args)], capture_output=True, text=True, env=env,
                         cwd=HERE, timeout=600)
    if out.returncode:
        raise RuntimeError(f"memory measurement {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["batched", "loop"])
@pytest.mark.parametrize("kind", MODE.memory_calls)
@pytest.mark.parametrize("defense", MODE.memory_defenses)
def test_peak_memory(benchmark, defense, kind, impl, device):
    n = max(MODE.replicas) if kind == "mc_predict" else min(N_EOT, max(MODE.replicas))
    args = (defense, kind, impl, n, MODE.batch, device)
    benchmark.group = f"memory-{kind}-n{n}-B{MODE.batch}-{defense}-{device}"
    benchmark.extra_info.update(impl=impl, section="memory", kind=kind, defense=defense, n=n, batch=MODE.batch)
    # The timed call is the whole fresh process; only its peak is reported.
    peak = benchmark.pedantic(lambda: peak_in_fresh_process(*args), rounds=1, iterations=1)
    benchmark.extra_info["peak_memory_mb"] = round(peak, 1)


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
