"""The extension: schemas agree with the Python registrations, a stale or missing build gives a
clear error, and NOISEKERNELS_BACKEND=reference runs the ops without it."""

import os
import subprocess
import sys

import pytest
import torch

import noisekernels as nk
from noisekernels import _extension, random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_python_schemas_match_the_cpp_ones():
    assert _extension._SCHEMAS  # the reference-mode definitions
    for name, schema in _extension._SCHEMAS.items():
        assert str(getattr(torch.ops.noisekernels, name).default._schema) == "noisekernels::" + schema


def test_build_info():
    info = nk.build_info()
    assert info["torch_version"] == torch.__version__ and not info["reference_only"]
    assert info["cuda"] == (torch.version.cuda is not None and info["cuda"])


def test_stale_sources_are_detected(monkeypatch):
    monkeypatch.setattr(_extension, "source_hash", lambda path: "0" * 16)
    with pytest.raises(ImportError, match="stale: csrc/ changed since it was built.*make build"):
        _extension._load()


def test_other_torch_version_is_detected(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ImportError, match="stale: built against torch .* running torch 0.0.1"):
        _extension._load()


def test_missing_extension_says_how_to_build():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'noisekernels._C': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import noisekernels\n"
    )
    r = _run(code)
    assert r.returncode != 0
    assert "noisekernels._C could not be loaded" in r.stderr
    assert "make build" in r.stderr and "NOISEKERNELS_BACKEND=reference" in r.stderr


def test_unknown_backend_mode_is_rejected():
    r = _run("import noisekernels", NOISEKERNELS_BACKEND="fast")
    assert r.returncode != 0 and "NOISEKERNELS_BACKEND must be 'auto' or 'reference'" in r.stderr


def test_reference_mode_runs_the_ops_without_the_extension():
    code = (
        "import sys, torch, noisekernels as nk\n"
        "assert 'noisekernels._C' not in sys.modules and nk.build_info()['reference_only']\n"
        "u = torch.ops.noisekernels.philox_uniform(torch.tensor(3), torch.tensor(2**32 - 2), [5], torch.float32, 1)\n"
        "z = nk.random.normal(5, 3, 2**32 - 2)\n"
        "print(repr(u.tolist())); print(repr(z.tolist()))\n"
        "from noisekernels.ops.noise_add import noise_add\n"
        "x, a = torch.ones(5, requires_grad=True), torch.tensor(0.5, requires_grad=True)\n"
        "noise_add(x, a, 3, 7).sum().backward(); print(repr([a.grad.item(), *x.grad.tolist()]))\n"
        "try:\n"
        "    nk.random.uniform(5, 3, 0, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    r = _run(code, NOISEKERNELS_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert eval(lines[0]) == random.uniform(5, 3, 2**32 - 2).tolist()
    torch.testing.assert_close(torch.tensor(eval(lines[1])), random.normal(5, 3, 2**32 - 2), rtol=2e-6, atol=4e-6)
    # The ops' autograd works without the extension: d/da sum(x + a * eps) = sum(eps), d/dx = 1.
    grads = torch.tensor(eval(lines[2]))
    torch.testing.assert_close(grads[0], random.normal(5, 3, 7).sum(), rtol=2e-6, atol=4e-6)
    assert grads[1:].tolist() == [1.0] * 5
    assert lines[3].startswith("refused: backend='cpu' needs noisekernels._C")
