"""Builds noisekernels._C: CPU kernels always; CUDA kernels when torch has CUDA and nvcc exists.

Environment switches:
  NOISEKERNELS_PORTABLE=1   no -march=native (a wheel that runs on any x86-64 / aarch64 CPU)
  NOISEKERNELS_NO_CUDA=1    skip the CUDA kernels even where they could be built
"""

import glob
import os
import sys

import setuptools
import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "noisekernels"))
from _source_hash import source_hash  # noqa: E402  (the same hash the package checks at import)

sys.path.pop(0)


def flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def has_bdist_wheel():
    """Whether setuptools can build a wheel: its own bdist_wheel from 70.1 on, the `wheel` package's before."""
    for module in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"):
        try:
            __import__(module)
            return True
        except ImportError:
            pass
    return False


# pip builds a wheel even for `pip install --no-build-isolation .`, with this environment's setuptools
# (no build dependencies are installed then): say what to install instead of "invalid command 'bdist_wheel'".
if {"bdist_wheel", "dist_info"} & set(sys.argv[1:]) and not has_bdist_wheel():
    sys.exit(f"noisekernels: this environment's setuptools {setuptools.__version__} cannot build a wheel (its "
             "bdist_wheel command came with setuptools 70.1; older ones need the `wheel` package). Run "
             "`python -m pip install wheel` (or `python -m pip install 'setuptools>=70.1'`), then "
             "`pip install --no-build-isolation .` again.")


with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not flag("NOISEKERNELS_NO_CUDA")
portable = flag("NOISEKERNELS_PORTABLE")

# The build's identity, compiled into _C so a stale extension is caught at import.
generated = os.path.join(ROOT, "build", "generated")
os.makedirs(generated, exist_ok=True)
info = (
    f'#define NOISEKERNELS_SOURCE_HASH "{source_hash(os.path.join(ROOT, "csrc"))}"\n'
    f'#define NOISEKERNELS_TORCH_VERSION "{torch.__version__}"\n'
    f"#define NOISEKERNELS_WITH_CUDA {int(with_cuda)}\n"
)
info_path = os.path.join(generated, "noisekernels_build_info.h")
if not os.path.exists(info_path) or open(info_path).read() != info:
    with open(info_path, "w") as f:
        f.write(info)

sources = sorted(["csrc/bindings/ops.cpp", "csrc/bindings/noise_add_autograd.cpp", "csrc/bindings/noise_layer.cpp",
                  "csrc/bindings/stream.cpp"]
                 + glob.glob("csrc/cpu/*.cpp"))
# -fopenmp: at::parallel_for is an inline `omp parallel` with torch's OpenMP backend; the runtime
# is torch's own libgomp.so.1 (same soname, already loaded). -Wno-maybe-uninitialized: GCC 12 false
# positive on _mm512_undefined_* inside the intrinsics headers.
# -ffp-contract=off: no fused multiply-adds, so noise values round exactly as on every backend.
# -std=c++20 (std::atomic_ref in the stream binding): torch 2.13 passes it anyway, torch 2.11 would pass c++17.
cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
if not portable:
    cxx.append("-march=native")
extra_link = ["-fopenmp"]
kwargs = dict(
    include_dirs=[os.path.join(ROOT, "csrc", "include"), generated],
    extra_compile_args={"cxx": cxx},
    extra_link_args=extra_link,
)
if with_cuda:
    sources += ["csrc/bindings/cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["extra_compile_args"]["nvcc"] = [
        "-O3",
        "-std=c++17",
        "-fmad=false",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    ext = CUDAExtension("noisekernels._C", sources, **kwargs)
else:
    ext = CppExtension("noisekernels._C", sources, **kwargs)

setup(
    name="noisekernels",
    version="0.1.0",
    description="Fused kernels for stochastic neural-network defenses: noise layers, MC ensembles, EOT",
    packages=find_packages(include=["noisekernels", "noisekernels.*"]),
    python_requires=">=3.10",
    # Tested with torch 2.11 + triton 3.6 (the GPU image's) and 2.13 + 3.9 (requirements.txt's pins).
    install_requires=["torch>=2.11", "numpy", "scikit-learn", "safetensors", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["noisekernels = noisekernels.cli:main"]},
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark", "triton>=3.6"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
