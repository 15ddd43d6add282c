"""The CUDA kernels of csrc/cuda built by g++ against the CPU emulation in tests/cuda_emulation and
called through ctypes on CPU tensors' data pointers (ARCHITECTURE.md section 4).

`library(variant)` compiles once per source hash into build/cuda_emulation/ (a few seconds per
file, files in parallel) and loads it. Variants: "gpu" builds the sources as nvcc does; "small_grid"
caps the grid at NK_MAX_BLOCKS=3 blocks so grid-stride loops and the min/max reduction's block cap
run many rounds on small tensors. `Emulated` mirrors csrc/bindings/cuda.cpp: one method per
launcher, taking the arguments of the op's reference function and allocating the outputs the
same way, so a launcher change is adapted here in one place.
"""

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")
VARIANTS = {"gpu": [], "small_grid": ["-DNK_MAX_BLOCKS=3"]}
SCHEDULES = {"in_order": 0, "reversed": 1, "shuffled": 2}
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
         "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(EMULATION, "include")]

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

# `extern __shared__ T name[];` (dynamic shared memory) has no g++ spelling: the emulated build
# turns it into a pointer to the launch's dynamic shared buffer. Everything else compiles as is.
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s*"
                             r"([A-Za-z_]\w*)\s*\[\s*\]\s*;")


def _sources():
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + sorted(glob.glob(os.path.join(EMULATION, "*.c*")))


def _inputs_hash(variant):
    digest = hashlib.sha256(" ".join([CXX, *FLAGS, *VARIANTS[variant]]).encode())
    digest.update(subprocess.run([CXX, "--version"], capture_output=True, check=True).stdout)
    headers = glob.glob(os.path.join(ROOT, "csrc", "include", "noisekernels", "*.h")) + glob.glob(
        os.path.join(ROOT, "csrc", "cuda", "*.cuh")) + glob.glob(os.path.join(EMULATION, "include", "*.h"))
    for path in sorted(headers) + _sources():
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _translate(source, out_dir):
    """The source as the emulated build compiles it: dynamic shared memory rewritten, line numbers
    and file name kept for the compiler's messages."""
    with open(source) as f:
        text = f.read()
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = static_cast<{m[1]}*>(::cuda_emulation::dynamic_shared_memory());", text)
    path = os.path.join(out_dir, os.path.basename(source) + ".cc")
    with open(path, "w") as f:
        f.write(f'#line 1 "{source}"\n{text}')
    return path


def build(variant):
    """Path of the emulated library for `variant`, compiled if its sources changed."""
    target_dir = os.path.join(ROOT, "build", "cuda_emulation", f"{variant}-{_inputs_hash(variant)}")
    lib = os.path.join(target_dir, "libnk_cuda_emulated.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(os.path.dirname(target_dir), exist_ok=True)
    work = tempfile.mkdtemp(dir=os.path.dirname(target_dir))
    jobs = []
    for source in _sources():
        obj = os.path.join(work, os.path.basename(source) + ".o")
        cmd = [CXX, *FLAGS, *VARIANTS[variant], "-iquote", os.path.dirname(source), "-x", "c++", "-c",
               _translate(source, work), "-o", obj]
        jobs.append((source, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    errors = [f"{source}:\n{proc.communicate()[0]}" for source, _, proc in jobs if proc.wait() != 0]
    if errors:
        raise RuntimeError("emulated CUDA build failed:\n" + "\n".join(errors))
    subprocess.run([CXX, "-shared", "-o", os.path.join(work, "lib.so"), *(obj for _, obj, _ in jobs)], check=True)
    os.replace(os.path.join(work, "lib.so"), os.path.join(work, os.path.basename(lib)))
    try:
        os.rename(work, target_dir)
    except OSError:  # built concurrently by another process: use theirs
        shutil.rmtree(work, ignore_errors=True)
    for stale in glob.glob(os.path.join(os.path.dirname(target_dir), f"{variant}-*")):
        if stale != target_dir:  # builds of older sources
            shutil.rmtree(stale, ignore_errors=True)
    return lib


class EmulatedLaunchError(RuntimeError):
    """A launch the emulation rejected or that failed inside the kernel (message from the emulation)."""


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _stream(seed, offset):
    return seed.reshape(1).contiguous(), offset.reshape(1).contiguous()


class Emulated:
    """The launchers of one emulated build on CPU tensors; outputs allocated as the CUDA bindings do."""

    def __init__(self, variant):
        self.lib = ctypes.CDLL(build(variant))
        i64, f32, f64, i32, p = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
        sig = {
            "nk_philox4x32": [p, p, p, i64],
            "nk_philox_fill": [p, i32, i64, i64, p, p, i32],
            "nk_random_spike": [p, p, p, i32, i64, i64, i64, f32, p, p, p],
            "nk_random_spike_backward": [p, p, p, i32, i64],
            "nk_noise_add": [p, p, p, i32, i64, i64, i64, i64, i64, i32, i32, f64, f64, p, p],
            "nk_noise_mul": [p, p, i32, i64, i64, i32, p, p],
            "nk_noise_mul_sum": [p, p, p, i32, i64, i64, i64, i64, i32, p, p],
            "nk_noise_add_foreach": [p, i64, i64, p, i32, i32, p, p],
            "nk_replica_reduce": [p, p, i32, i64, i64, i64, i32],
            "nk_offset_reserve": [p, p, i64],
            "nk_emu_set_schedule": [i32, ctypes.c_uint64],
            "nk_emu_last_failure": [ctypes.c_char_p, i32],
        }
        for name, args in sig.items():
            getattr(self.lib, name).argtypes = args
        self.lib.nk_emu_set_schedule.restype = None
        self.lib.nk_emu_last_failure.restype = None

    def set_schedule(self, mode, seed=0):
        self.lib.nk_emu_set_schedule(SCHEDULES[mode], seed)

    def check(self, err):
        if err != 0:
            buf = ctypes.create_string_buffer(1024)
            self.lib.nk_emu_last_failure(buf, len(buf))
            raise EmulatedLaunchError(f"cudaError {err}: {buf.value.decode()}")

    def philox4x32(self, counter, key):
        c, k = counter.contiguous(), key.contiguous()
        out = torch.empty_like(c)
        self.check(self.lib.nk_philox4x32(_ptr(out), _ptr(c), _ptr(k), c.numel() // 4))
        return out

    def _fill(self, seed, offset, size, dtype, segments, normal):
        seed, offset = _stream(seed, offset)
        out = torch.empty(size, dtype=dtype)
        self.check(self.lib.nk_philox_fill(_ptr(out), DTYPES[dtype], out.numel(), segments, _ptr(seed), _ptr(offset),
                                           normal))
        return out

    def philox_uniform(self, seed, offset, size, dtype, segments):
        return self._fill(seed, offset, size, dtype, segments, 0)

    def philox_normal(self, seed, offset, size, dtype, segments):
        return self._fill(seed, offset, size, dtype, segments, 1)

    def random_spike(self, x, p, seed, offset, groups, segments):
        seed, offset = _stream(seed, offset)
        xc = x.contiguous()
        out = torch.empty_like(xc)
        mask = torch.empty((xc.numel() + 7) // 8, dtype=torch.uint8)
        workspace = torch.empty(2 * groups, dtype=torch.int64)
        self.check(self.lib.nk_random_spike(_ptr(xc), _ptr(out), _ptr(mask), DTYPES[x.dtype], xc.numel(), groups,
                                            segments, p, _ptr(seed), _ptr(offset), _ptr(workspace)))
        return out, mask

    def random_spike_backward(self, grad, mask):
        gc, mc = grad.contiguous(), mask.contiguous()
        out = torch.empty_like(gc)
        self.check(self.lib.nk_random_spike_backward(_ptr(gc), _ptr(mc), _ptr(out), DTYPES[grad.dtype], gc.numel()))
        return out

    def noise_add(self, x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments):
        seed, offset = _stream(seed, offset)
        xc, sc = x.contiguous(), scale.contiguous()
        size = (x.shape[0] * replicas, *x.shape[1:]) if replicas != 1 else x.shape
        out = torch.empty(size, dtype=x.dtype)
        self.check(self.lib.nk_noise_add(_ptr(xc), _ptr(sc), _ptr(out), DTYPES[x.dtype], xc.numel(), replicas,
                                         segments, inner, channels, dist, lo is not None, lo or 0.0, hi or 0.0,
                                         _ptr(seed), _ptr(offset)))
        return out

    def noise_mul(self, grad, seed, offset, dist, segments):
        seed, offset = _stream(seed, offset)
        gc = grad.contiguous()
        out = torch.empty_like(gc)
        self.check(self.lib.nk_noise_mul(_ptr(gc), _ptr(out), DTYPES[grad.dtype], gc.numel(), segments, dist,
                                         _ptr(seed), _ptr(offset)))
        return out

    def noise_mul_sum(self, grad, seed, offset, dist, inner, channels, segments):
        seed, offset = _stream(seed, offset)
        gc = grad.contiguous()
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        out = torch.zeros(channels, dtype=acc)
        n = gc.numel()  # the workspace as noise_mul_sum_workspace sizes it
        pieces = 0 if n == 0 else n // (n if channels == 1 else inner) * -(-(n if channels == 1 else inner) // 4096)
        workspace = torch.empty(pieces, dtype=acc)
        self.check(self.lib.nk_noise_mul_sum(_ptr(gc), _ptr(out), _ptr(workspace), DTYPES[grad.dtype], n, segments,
                                             inner, channels, dist, _ptr(seed), _ptr(offset)))
        return out

    def noise_add_foreach(self, xs, scales, seed, offset, starts, dist):
        seed, offset = _stream(seed, offset)
        k = len(xs)
        inputs = [x.contiguous() for x in xs]
        outputs = [torch.empty_like(x) for x in inputs]
        first = [0]  # counter prefix sums: four elements per counter
        for x in inputs:
            first.append(first[-1] + (x.numel() + 3) // 4)
        meta = torch.tensor([x.data_ptr() for x in inputs] + [o.data_ptr() for o in outputs] + first + list(starts)
                            + [x.numel() for x in inputs], dtype=torch.int64)
        if k and first[-1]:
            sc = scales.contiguous()
            self.check(self.lib.nk_noise_add_foreach(_ptr(meta), k, first[-1], _ptr(sc), DTYPES[xs[0].dtype], dist,
                                                     _ptr(seed), _ptr(offset)))
        return outputs

    def offset_reserve(self, offset, n):
        start = torch.empty_like(offset)
        self.check(self.lib.nk_offset_reserve(_ptr(offset), _ptr(start), n))
        return start

    def replica_reduce(self, logits, mode):
        x = logits.contiguous()
        sums = torch.empty(x.shape[1:], dtype=torch.float64)  # the launcher accumulates in double
        self.check(self.lib.nk_replica_reduce(_ptr(x), _ptr(sums), DTYPES[x.dtype], *x.shape, mode == 1))
        return sums.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
