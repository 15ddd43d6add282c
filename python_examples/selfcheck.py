"""Self-check: every backend reproduces the stream contract, then the stream benchmark.

Runs the Random123 known answers and a cross-backend comparison (uniforms bit for bit, normals to
a few ulp) on reference, CPU C++, Triton (interpreted on CPU tensors without a GPU) and CUDA when
present, then times 3.2M-value fills against torch and numpy's Philox.
"""

import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402

import noisekernels as nk  # noqa: E402
from noisekernels import random  # noqa: E402

KNOWN_ANSWER = ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])
N = 3_200_000


def backends():
    yield "reference", "cpu"
    yield "cpu", "cpu"
    yield "triton", "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available() and nk.build_info()["cuda"]:
        yield "cuda", "cuda"


def check_backends():
    counter, key, expected = KNOWN_ANSWER
    ref_u = random.uniform(100_003, 42, 2**32 - 50_000, backend="reference")
    ref_z = random.normal(100_003, 42, 2**32 - 50_000, backend="reference")
    for backend, device in backends():
        words = random.philox4x32(torch.tensor([counter], device=device), torch.tensor(key, device=device), backend=backend)
        u = random.uniform(100_003, 42, 2**32 - 50_000, device=device, backend=backend).cpu()
        z = random.normal(100_003, 42, 2**32 - 50_000, device=device, backend=backend).cpu()
        kat = words[0].tolist() == expected
        same_u = torch.equal(u, ref_u)
        dz = (z - ref_z).abs().max().item()
        ok = kat and same_u and dz < 4e-6
        print(f"  {backend:9s} on {device:4s}: known answer {'ok' if kat else 'WRONG'}, "
              f"uniforms {'bit-exact' if same_u else 'DIFFER'}, normals max |diff| {dz:.1e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit(f"self-check failed on backend {backend}")


def median_ms(fn, rounds=30):
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def benchmark():
    seed, offset = torch.tensor(1234), torch.tensor(0)
    g = np.random.Generator(np.random.Philox(1234))
    rows = [
        ("uniform", lambda: random.uniform(N, seed, offset), lambda: torch.rand(N), lambda: g.random(N, dtype=np.float32)),
        ("normal", lambda: random.normal(N, seed, offset), lambda: torch.randn(N), lambda: g.standard_normal(N, dtype=np.float32)),
    ]
    print(f"\nStream benchmark, {N:,} float32 values on CPU ({torch.get_num_threads()} threads), median of 30:")
    for name, ours, torch_fn, numpy_fn in rows:
        t_ours, t_torch, t_numpy = median_ms(ours), median_ms(torch_fn), median_ms(numpy_fn)
        print(f"  {name:8s} noisekernels {t_ours:6.2f} ms | torch {t_torch:6.2f} ms ({t_torch / t_ours:4.1f}x) | "
              f"numpy Philox {t_numpy:6.2f} ms ({t_numpy / t_ours:4.1f}x)")


if __name__ == "__main__":
    info = nk.build_info()
    print(f"noisekernels {nk.__version__}: torch {torch.__version__}, CUDA kernels {'built' if info['cuda'] else 'not built'}, "
          f"CPU path {'AVX-512' if info['avx512'] else 'portable'}")
    print("Stream contract on every backend (100,003 values from offset 2**32 - 50,000):")
    check_backends()
    benchmark()
