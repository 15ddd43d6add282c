"""Evaluation across processes: a dataset split into batches, the batches dealt to torchrun ranks,
the per-example results gathered into one table.

Every batch draws its noise from streams derived from (seed, batch index) only: the model's
streams and the attack's (or certifier's) stream are reseeded per batch. A batch's result is
therefore the same whichever rank runs it, and the gathered result of any number of processes
equals a single-process run with the same seeds (with the same batch size, and the same
per-process thread count on CPU, where float sums can depend on it).
"""

import atexit
import contextlib
import os

import torch

from .stream import Stream, derive_seed


def _seed_int(seed_tensor):
    """A seed tensor (int64 holding 64 bits) as an int in [0, 2**64)."""
    return int(seed_tensor) % 2**64


def init():
    """(rank, world size): joins torchrun's process group (gloo on CPU, nccl with a GPU) when
    launched by torchrun with more than one process, else (0, 1). A group joined here is left at
    interpreter exit: a rank that finished first and exited with the group alive could abort in
    the backend's threads ("terminate called without an active exception", SIGABRT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
        atexit.register(_leave)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _leave():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _rank_world(rank, world):
    if rank is None and world is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    return rank, world


def shard(n, batch_size, rank=None, world=None):
    """This rank's batches of a dataset of n examples: [(batch index, start, stop)], batch b going
    to rank b % world. rank/world default to torch.distributed's (0 and 1 outside it)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    rank, world = _rank_world(rank, world)
    starts = range(0, n, batch_size)
    return [(b, s, min(s + batch_size, n)) for b, s in enumerate(starts) if b % world == rank]


def gather(results):
    """Joins every rank's per-example results ({name: tensor with one row per example}, holding an
    "index" column) into one table sorted by index, on every rank (all_gather; a no-op with one
    process). Tensors come back on the CPU."""
    if "index" not in results:
        raise ValueError("results must hold an 'index' tensor (the examples' positions in the dataset)")
    local = {k: v.detach().cpu() for k, v in results.items()}
    parts = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
    joined = {k: torch.cat([p[k] for p in parts]) for k in local}
    order = joined["index"].argsort()
    return {k: v[order] for k, v in joined.items()}


@contextlib.contextmanager
def reseeded(model, seed, index):
    """Runs the block with every Stream of model reseeded to a sub-stream of (its seed, seed,
    index) at offset 0, and puts the streams back afterwards."""
    streams = [m for m in model.modules() if isinstance(m, Stream)]
    saved = [(s.seed.clone(), s.offset.clone()) for s in streams]
    try:
        with torch.no_grad():
            for s in streams:
                s.seed.copy_(derive_seed(derive_seed(s.seed, seed), index))
                s.offset.zero_()
        yield model
    finally:
        with torch.no_grad():
            for s, (seed_t, offset) in zip(streams, saved):
                s.seed.copy_(seed_t)
                s.offset.copy_(offset)


def batch_seed(seed, index):
    """The seed (an int) of batch `index` of a run seeded with `seed`."""
    return _seed_int(derive_seed(Stream(seed).seed, index))


def attack_dataset(model, make_attack, x, y, *, batch_size, seed, rank=None, world=None):
    """Runs an attack over this rank's batches of (x, y) and returns its per-example results:
    index, label, clean (the attack's MC judgement of x is correct) and robust (the same on the
    adversarial example). make_attack(seed) builds the attack for one batch from that batch's
    seed. Combine the ranks' results with gather()."""
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must have x's batch size {x.shape[0]}, got shape {tuple(y.shape)}")
    rows = {"index": [], "label": [], "clean": [], "robust": []}
    for b, start, stop in shard(x.shape[0], batch_size, rank, world):
        xb, yb = x[start:stop], y[start:stop]
        with reseeded(model, seed, b):
            attack = make_attack(batch_seed(seed, b))
            if attack.targeted:
                raise ValueError("attack_dataset measures robust accuracy: make_attack must build an untargeted attack")
            clean = ~attack.succeeded(xb, yb)
            attack(xb, yb)
            robust = ~attack.success
        rows["index"].append(torch.arange(start, stop))
        rows["label"].append(yb.cpu())
        rows["clean"].append(clean.cpu())
        rows["robust"].append((robust & clean).cpu())
    if not rows["index"]:
        return {"index": torch.zeros(0, dtype=torch.long), "label": y[:0].cpu(),
                "clean": torch.zeros(0, dtype=torch.bool), "robust": torch.zeros(0, dtype=torch.bool)}
    return {k: torch.cat(v) for k, v in rows.items()}


__all__ = ["attack_dataset", "batch_seed", "gather", "init", "reseeded", "shard"]
