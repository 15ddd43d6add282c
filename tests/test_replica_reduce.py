"""replica_reduce on every backend against the reference, and its NaN rule (issue 9): a NaN logit
counts as -inf in a vote, so it never wins, and a row of NaNs votes for no class (issue 23)."""

import math

import pytest
import torch

from conftest import KERNEL_BACKENDS
from noisekernels.ops.replica_reduce import replica_reduce

ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")]


def _vote_by_hand(logits):
    """Each replica votes for its largest non-NaN logit (first index on ties; no vote when all are NaN)."""
    n, b, c = logits.shape
    out = torch.zeros(b, c)
    for r in range(n):
        for i in range(b):
            row = [(-math.inf if math.isnan(v) else v) for v in logits[r, i].tolist()]
            if not all(math.isnan(v) for v in logits[r, i].tolist()):
                out[i, row.index(max(row))] += 1
    return out


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_nan_never_wins_a_vote(backend, device):
    logits = torch.tensor([[[math.nan, 1.0, 2.0], [0.5, math.nan, 0.1], [math.nan] * 3],
                           [[3.0, math.nan, 3.0], [math.nan, -math.inf, -1.0], [1.0, math.nan, math.nan]]])
    got = replica_reduce(logits.to(device), "vote", backend=backend).cpu()
    assert torch.equal(got, _vote_by_hand(logits))
    assert got[2].tolist() == [1, 0, 0]  # the all-NaN replica cast no vote
    wide = torch.full((2, 3, 70), math.nan)  # more classes than a warp's lanes
    wide[1, 1, 65] = -math.inf
    assert replica_reduce(wide.to(device), "vote", backend=backend).cpu().sum(1).tolist() == [0, 1, 0]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_equals_reference(backend, device, dtype):
    logits = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, 2, 3] = math.nan
    for mode in ("mean", "vote"):
        expected = replica_reduce(logits, mode, backend="reference")
        got = replica_reduce(logits.to(device), mode, backend=backend).cpu()
        torch.testing.assert_close(got, expected, equal_nan=True)
    assert replica_reduce(logits, "mean", backend=backend)[2].isnan().all()  # a NaN row's mean is NaN


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 0, 4), (2, 5, 0)])
def test_empty(backend, device, shape):
    for mode in ("mean", "vote"):
        got = replica_reduce(torch.empty(shape, device=device), mode, backend=backend)
        assert got.shape == shape[1:] and got.numel() == 0
