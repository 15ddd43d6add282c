import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import noisekernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_KERNELS = HAS_CUDA and noisekernels.build_info()["cuda"]
needs_cuda_kernels = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the C++ CUDA kernels")

# (backend, device) pairs every kernel is checked on; GPU ones skip cleanly without a GPU.
KERNEL_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda_kernels),
]


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for one test and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
