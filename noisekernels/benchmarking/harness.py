"""What the suite's benchmark files share that does not depend on pytest's conftest: the modes
(sizes and rounds; NK_BENCH_MODE, set by `noisekernels bench`), the devices, synchronisation and
the saved-for-backward measurement. benchmarks/conftest.py re-exports them."""

import os
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# The devices every benchmark runs on; CUDA ones skip cleanly without a GPU.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]


def sync(device):
    """Waits for the device's queued work (timings of asynchronous GPU launches)."""
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Mode:
    """Sizes and rounds of one mode of the suite (NK_BENCH_MODE; `noisekernels bench` sets it)."""

    provider_numel: int  # elements of each op's tensor in bench_providers
    rounds: int
    warmup: int
    scaling_sizes: tuple  # tensor sizes of bench_scaling
    replicas: tuple  # n of the replica scaling and of the engine's memory runs
    batch: int  # inputs per engine batch (scaling and memory)
    engine_batch: int = 100  # inputs of the engine's MC/EOT ratios against the loop (bench_ensemble)
    attack_batch: int = 200  # inputs each attack crafts in the attack benchmarks (bench_apgd, bench_attacks)
    certify_inputs: int = 4  # inputs certified in bench_certify
    paired_rounds: int = 7  # rounds of the engine's paired ratios (bench_ensemble)
    memory_defenses: tuple = ("rs1", "rse", "a2snn")  # each measurement is a fresh process (seconds)
    memory_calls: tuple = ("mc_predict", "eot_grad")
    zoo_batches: tuple = (32,)  # batches of the engine on the zoo (bench_zoo)
    zoo_attack_models: tuple = ("rs1-cnn",)  # zoo models attacked against torchattacks (bench_zoo)
    zoo_attack_batch: int = 32  # inputs each zoo attack crafts
    zoo_attack_rounds: int = 1  # paired rounds of each zoo attack
    certify_n: int = 10_000  # noisy samples per certified input (bench_certify)
    sequential_inputs: int = 100  # digits certified by both methods in bench_certify_sequential (N = 100,000)
    fit_steps: int = 60  # Adam steps that train the attacked and certified models
    # torch.compile's backend for the "compile" providers: inductor (what users get), except in the
    # smoke run, which checks agreement and the report in seconds (inductor's codegen takes minutes).
    compile_backend: str = "inductor"


# Every model of benchmarks/zoo.py: the goal for the attacks is "on every zoo model".
ZOO_MODELS = ("residual-rse", "rs1-cnn", "noisy-mlp", "rse", "pni", "a2snn", "gda", "weight-noise")
MODES = {
    "smoke": Mode(4096, 1, 0, (1_000, 10_000), (1, 4), 8, memory_defenses=("rs1",),
                  memory_calls=("mc_predict",), paired_rounds=1, compile_backend="aot_eager"),
    # A few minutes on 2 cores: the engine, attack and certification runs at a quarter of the
    # inputs of the full mode (the issues' sizes), where their goals are stated.
    "quick": Mode(32 * 32 * 28 * 28, 5, 1, (1_000, 10_000, 100_000, 1_000_000, 10_000_000), (1, 2, 5, 10, 20, 50), 32,
                  paired_rounds=3, engine_batch=25, attack_batch=50, certify_inputs=1, sequential_inputs=50),
    "full": Mode(128 * 32 * 28 * 28, 30, 3, (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000),
                 (1, 2, 5, 10, 20, 50, 100), 100, zoo_batches=(32, 200),
                 zoo_attack_models=ZOO_MODELS, zoo_attack_rounds=2),
    # scripts/gpu_check.py (make gpu-check): 256 MiB tensors, far past a GPU's caches, so GB/s is
    # the memory's; the engine, attacks and certification at the full mode's sizes.
    "gpu": Mode(2**26, 20, 3, (), (), 100, certify_inputs=2, paired_rounds=5, zoo_batches=(32, 200),
                # three of the zoo's models: every one would pass the check's 8-minute budget
                zoo_attack_models=("residual-rse", "rs1-cnn", "a2snn"), zoo_attack_rounds=2),
    # gpu_check.py --short: a rerun inside the same lease.
    "gpu-short": Mode(2**26, 5, 1, (), (), 100, certify_inputs=1, paired_rounds=3, zoo_batches=(200,)),
    # gpu_check.py --dry-run: the same steps on CPU at sizes that take seconds.
    "dry-run": Mode(4096, 1, 0, (), (), 8, certify_inputs=1, paired_rounds=1, compile_backend="aot_eager",
                    zoo_batches=(4,), zoo_attack_batch=4, certify_n=1_000, fit_steps=5),
}
MODE_NAME = os.environ.get("NK_BENCH_MODE", "full")
if MODE_NAME not in MODES:
    raise ValueError(f"NK_BENCH_MODE must be one of {tuple(MODES)}, got {MODE_NAME!r}")
MODE = MODES[MODE_NAME]


def full_size_goal(goal):
    """A goal of the engine, attack and certification benchmarks, stated at the full mode's sizes
    (the issues'): other modes report their ratios without a met / MISSED verdict."""
    return goal if MODE_NAME == "full" else None


def saved_bytes_per_element(fn, numel):
    """Bytes autograd keeps for backward while fn() builds its graph (saved_tensors_hooks, each
    storage counted once), per element of the op's input."""
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values()) / numel
