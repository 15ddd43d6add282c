"""One training loop for every defense preset: SGD or Adam on the papers' schedules, progress bars,
a JSON-lines metrics log, and a checkpoint every epoch that resumes bit for bit.

    config = TrainConfig(defense="rse", epochs=10)
    model = Trainer(config, "runs/rse").fit()

A run directory holds config.json, metrics.jsonl and checkpoint/ (weights.safetensors: the model's
state_dict, noise streams included; state.pt: optimiser, scheduler, epoch, the shuffling
generator, torch's generators and the driver's own streams, loaded with
torch.load(weights_only=True), so loading never executes code; metrics.jsonl: one line per epoch
so far). Shuffling uses a torch.Generator the trainer owns. torch's own generators (the CPU one and
the device's), which a model of your own may draw from (nn.Dropout, torch.randn), are the run's
while it trains: seeded from its seed, checkpointed and restored, and the caller's states put back
when fit returns.

A checkpoint is one commit: each epoch's files go into a new directory checkpoint-<epoch>, flushed
to disk, and one atomic replace of the symlink `checkpoint` switches to it (run_dir/metrics.jsonl
is a fixed link into it). A kill at any instant leaves the previous epoch's checkpoint or the new
one, never a mix, and resuming removes what the kill left behind. Missing, truncated or foreign
files raise CheckpointError naming the file. A run copied with its links followed (cp -rL:
checkpoint/ a real directory) resumes; its next commit moves that directory aside to
checkpoint.old, then links `checkpoint` (a kill in between leaves checkpoint.old, the committed
epoch, which resuming moves back). One process trains in a run directory at a time: an exclusive
lock on run_dir/.lock, held from the Trainer's construction until fit returns.

Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel (gloo on CPU, nccl on
GPU) over a DistributedSampler; each rank's noise streams are its own (for_rank, applied after
DDP's initial broadcast, which would otherwise copy rank 0's seeds). Rank 0 writes checkpoints with
the streams' base seeds, so a run resumes under any world size.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
import types
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from . import data as datasets
from . import defenses, distributed
from . import models as zoo
from .attacks import PGD
from .stream import Stream, for_rank

# The papers' optimiser schedules (milestones in epochs, lr multiplied by gamma at each).
SCHEDULES = {
    "adam": dict(optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, epochs=20, batch_size=64,
                 milestones=(), gamma=1.0),
    # random-spiking.txt Table 7, MNIST: SGD lr 0.01, momentum 0.9, batch 128, 50 epochs.
    "cw-mnist": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, epochs=50, batch_size=128,
                     milestones=(), gamma=1.0),
    # random-spiking.txt Table 7, F-MNIST / CIFAR-10 (WRN): lr 0.1 x0.2 at 60, 120, 160; 200 epochs.
    "wrn-cifar": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=200, batch_size=128,
                      milestones=(60, 120, 160), gamma=0.2),
    # a2snn-anisotropic-noise.txt appendix B: batch 128; F-MNIST lr 1e-3 100 epochs, CIFAR lr 1e-2 200
    # epochs; SGD (section 3.2); momentum is not stated (0.9 here).
    "a2snn-fmnist": dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, epochs=100, batch_size=128,
                         milestones=(), gamma=1.0),
    "a2snn-cifar": dict(optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=0.0, epochs=200, batch_size=128,
                        milestones=(), gamma=1.0),
}
_RESUME_FREE = ("epochs", "progress", "compile")  # may change when a run is resumed
_DATA_SOURCE = ("dataset", "data_root", "dataset_name")  # where the data was read: free if its sha256 is the same
CHECKPOINT_FILES = ("weights.safetensors", "state.pt", "metrics.jsonl")
_CHECKPOINT_VERSION = re.compile(r"checkpoint-\d+")  # committed, or left behind by a kill
_MOVED_ASIDE = "checkpoint.old"  # a copy's real checkpoint/ directory while the link replaces it


class CheckpointError(ValueError):
    """A run's checkpoint is missing, incomplete, unreadable or of another run (the CLI prints it as
    a usage error)."""


class RunDirectoryLocked(ValueError):
    """Another process trains in the run directory (the CLI prints it as a usage error)."""


@dataclasses.dataclass
class TrainConfig:
    """What a run trains. None takes the preset's (model) or the schedule's (epochs, batch_size, lr,
    weight_decay) value. options: the defense's options (defenses.PRESETS[...].options).
    dataset: a data.NAMES name (data_root its directory) or a .npz file; a Trainer given a
    Dataset records that one's source instead (None: data in memory). model: a zoo architecture
    or a class of your own ("path/to/file.py:ClassName", "package.module:ClassName"; models/user.py),
    model_options its constructor's arguments. Paths are made absolute by resolved()."""

    defense: str = "standard"
    dataset: Optional[str] = "digits"
    data_root: Optional[str] = None
    model: Optional[str] = None
    model_options: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    schedule: str = "adam"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    channels_last: bool = False
    bf16: bool = False
    progress: bool = True

    def resolved(self):
        """A copy with every None filled from the preset and schedule, values checked."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {self.schedule!r}")
        preset = defenses.get(self.defense)
        sched = SCHEDULES[self.schedule]
        model = self.model or preset.model
        cfg = dataclasses.replace(
            self, model=zoo.user.absolute(model) if zoo.is_user_spec(model) else model,
            dataset=os.path.abspath(self.dataset) if datasets.is_file(self.dataset) else self.dataset,
            data_root=os.path.abspath(self.data_root) if self.data_root is not None else None,
            options=defenses.resolve_options(preset, self.options),
            epochs=sched["epochs"] if self.epochs is None else self.epochs,
            batch_size=sched["batch_size"] if self.batch_size is None else self.batch_size,
            lr=sched["lr"] if self.lr is None else self.lr,
            weight_decay=sched["weight_decay"] if self.weight_decay is None else self.weight_decay)
        for name in ("epochs", "batch_size"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'epochs' else 1}, got {value!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a float >= 0, got {value!r}")
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**62:
            raise ValueError(f"seed must be an int in [0, 2**62), got {cfg.seed!r}")
        if cfg.bf16 and torch.device(cfg.device).type not in ("cpu", "cuda"):
            raise ValueError("bf16 autocast needs device cpu or cuda")
        return cfg


def model_info(dataset):
    """What a model needs from its dataset (shape, classes, normalisation)."""
    return types.SimpleNamespace(shape=dataset.shape, num_classes=dataset.num_classes, mean=dataset.mean,
                                 std=dataset.std)


class _DriverStreams(nn.Module):
    """The loop's own noise: data augmentation (GDA) and the adversarial-training attack's starts."""

    def __init__(self, seed):
        super().__init__()
        self.augment = Stream(2 * seed + 1)
        self.attack = Stream(2 * seed + 2)


@contextlib.contextmanager
def _crafting(model):
    """Adversarial examples are crafted in eval mode (batch norm on running statistics, as the
    ensemble engine requires) with every noise layer on, as the noisy model trains."""
    layers = defenses.noise_layers(model)
    saved = model.training, [m.mc for m in layers]
    model.eval()
    for m in layers:
        m.mc = True
    try:
        yield
    finally:
        model.train(saved[0])
        for m, mc in zip(layers, saved[1]):
            m.mc = mc


def _stream_seeds(model):
    return {name: s.seed.clone() for name, s in model.named_modules() if isinstance(s, Stream)}


def save_weights(model, path, base_seeds=None):
    """The model's state_dict as safetensors; base_seeds replace the per-rank stream seeds."""
    state = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    for name, seed in (base_seeds or {}).items():
        state[f"{name}.seed"] = seed.cpu()
    save_file(state, path)


def _few(keys):
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_weights(model, path, device="cpu", expected="this model"):
    """Loads the safetensors state_dict at path into model; a file that is unreadable or holds
    another model's weights raises CheckpointError naming it (expected: what it should match)."""
    try:
        weights = load_file(path, device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e})") from None
    own = model.state_dict()
    problems = [f"{what} keys {_few(keys)}" for what, keys in (
        ("missing", [k for k in own if k not in weights]), ("unexpected", [k for k in weights if k not in own]),
        ("other shapes for", [f"{k} ({list(weights[k].shape)}, the model's {list(own[k].shape)})" for k in own
                              if k in weights and weights[k].shape != own[k].shape])) if keys]
    if problems:
        raise CheckpointError(f"{path} does not hold the weights of {expected}: {'; '.join(problems)}")
    model.load_state_dict(weights)


def _fsync(path):
    """Flushes a file's or directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path, write):
    """Replaces path by what write(tmp) creates (a file or a symlink) with one rename, flushed to
    disk: a kill leaves the old path or the new one, never a half-written one."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):  # a killed replace's
        os.remove(tmp)
    write(tmp)
    if not os.path.islink(tmp):  # a link is all in its directory entry, flushed below
        _fsync(tmp)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def has_checkpoint(run_dir):
    """Whether run_dir holds a committed checkpoint (a run to resume)."""
    return os.path.lexists(os.path.join(run_dir, "checkpoint")) or os.path.isdir(os.path.join(run_dir, _MOVED_ASIDE))


def _seeded_torch_rng(seed, rank, epoch, device):
    """States for torch's CPU generator (and the device's, on CUDA) seeded from the run's seed, the
    rank and the epoch the process starts at; a hash keeps them apart from the seeds of weights and
    shuffling (torch.manual_seed(seed), torch.Generator().manual_seed(seed))."""
    value = int.from_bytes(hashlib.sha256(f"torch {seed} {rank} {epoch}".encode()).digest()[:8], "little")
    state = {"cpu": torch.Generator().manual_seed(value).get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device).manual_seed(value).get_state()
    return state


def _read_metrics(path):
    """metrics.jsonl's lines, each checked to be epoch i's JSON object on line i."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not a text file ({e})") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (line.endswith("\n") and isinstance(record, dict) and type(record.get("epoch")) is int
                and record["epoch"] == number):
            raise CheckpointError(f"{path} line {number} is not the metrics of epoch {number} (one JSON object with "
                                  f"\"epoch\": {number} per line): {line[:80]!r}")
    return lines


class Trainer:
    """Trains one model of one preset in run_dir; resume=True continues a run there from its last
    checkpoint (the same run bit for bit: weights, noise, shuffling)."""

    def __init__(self, config, run_dir, *, resume=False, dataset=None, _teacher_of=None):
        self.is_teacher = _teacher_of is not None
        self.student_started = self.is_teacher and _teacher_of.epoch > 0
        self.config = cfg = config.resolved()
        self.run_dir = run_dir
        self.rank, self.world = distributed.init()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {self.world}")
        self.device = torch.device(cfg.device)
        self.data = dataset if dataset is not None else datasets.load(cfg.dataset, cfg.data_root)
        if dataset is not None:  # record where the data given came from, not the config's default
            self.config = cfg = dataclasses.replace(cfg, dataset=dataset.source, data_root=dataset.root)
        self.data_sha256 = self.data.sha256()
        self.model, self.preset, self.options = defenses.build(
            cfg.defense, model_info(self.data), model=cfg.model, model_options=cfg.model_options,
            options=cfg.options, seed=cfg.seed)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.streams = _DriverStreams(cfg.seed).to(self.device)
        sched = SCHEDULES[cfg.schedule]
        groups = defenses.weight_decay_groups(self.model, cfg.weight_decay)
        if sched["optimizer"] == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=cfg.lr)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=sched["momentum"])
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(sched["milestones"]), sched["gamma"])
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.torch_rng = None  # torch's generators' states while this run trains (_torch_rng's form)
        self.epoch = 0
        self.metrics = []  # metrics.jsonl's lines, committed with each checkpoint
        self.teacher = None
        self._lock_file = None
        self._prepare_run_dir(resume)
        if self.torch_rng is None:  # a fresh run, or a resume under torchrun (rank 0's state alone is saved)
            self.torch_rng = _seeded_torch_rng(cfg.seed, self.rank, self.epoch, self.device)
        # Base seeds (what checkpoints hold); each rank then draws from its own streams.
        self.base_seeds = _stream_seeds(self.model)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
            for_rank(self.model, self.rank)
            for_rank(self.streams, self.rank)
        forward = self.ddp or self.model
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.attack = None
        if self.preset.adversarial:
            o = self.options
            alpha = o["adv_alpha"] if o["adv_alpha"] is not None else 2.5 * o["adv_eps"] / o["adv_steps"]
            self.attack = PGD(self.model, eps=o["adv_eps"], alpha=alpha, steps=o["adv_steps"], seed=0)
            self.attack.stream = self.streams.attack

    # ------------------------------------------------------------------ run directory, checkpoints

    @property
    def checkpoint_dir(self):
        return os.path.join(self.run_dir, "checkpoint")

    def _config_json(self):
        return {**dataclasses.asdict(self.config), "input_shape": list(self.data.shape),
                "num_classes": self.data.num_classes, "dataset_name": self.data.name,
                "dataset_sha256": self.data_sha256, **zoo.user.provenance(self.config.model)}

    @property
    def teacher_dir(self):
        return os.path.join(self.run_dir, "teacher")

    def _lock(self):
        """Takes the run directory's exclusive lock (rank 0, which writes there), or refuses."""
        if self.rank != 0 or self._lock_file is not None:
            return
        path = os.path.join(self.run_dir, ".lock")
        lock_file = open(path, "a")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise RunDirectoryLocked(f"{self.run_dir} is locked ({path}): another process trains there; wait for it "
                                     "to finish or choose another run directory") from None
        self._lock_file = lock_file

    def _unlock(self):
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases its lock
            self._lock_file = None

    def _prepare_run_dir(self, resume):
        # the teacher's checkpoint alone: a distillation run killed while its teacher trained
        teacher_only = self.preset.distill and not self.is_teacher and has_checkpoint(self.teacher_dir)
        if resume and not (has_checkpoint(self.run_dir) or teacher_only):  # refused before creating anything
            raise CheckpointError(f"cannot resume {self.run_dir}: nothing to resume ({self.checkpoint_dir} is "
                                  "missing: no epoch was committed)")
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self._lock()
        try:
            if has_checkpoint(self.run_dir) and not resume:
                raise FileExistsError(f"{self.run_dir} already holds a run: resume it or choose another run directory")
            if resume:
                self._check_same_run()
                if has_checkpoint(self.run_dir):
                    self.load_checkpoint()
                if self.student_started:  # the teacher was complete: a student trained longer keeps it as it was
                    self.config = dataclasses.replace(self.config, epochs=self.epoch)
                if self.config.epochs < self.epoch:
                    raise ValueError(f"cannot resume {self.run_dir} with epochs {self.config.epochs}: it has committed "
                                     f"epoch {self.epoch} already (give epochs >= {self.epoch})")
            if self.rank == 0:
                self._move_back_aside()
                self._remove_uncommitted()
                _atomic(os.path.join(self.run_dir, "config.json"), lambda p: _write_json(p, self._config_json()))
                _atomic(os.path.join(self.run_dir, "metrics.jsonl"),
                        lambda p: os.symlink(os.path.join("checkpoint", "metrics.jsonl"), p))
        except BaseException:
            self._unlock()
            raise

    def _check_same_run(self):
        """Refuses to resume with settings other than config.json's, naming the recorded and given values;
        data read from elsewhere with the same content (sha256) is the same data."""
        saved = os.path.join(self.run_dir, "config.json")
        if not os.path.isfile(saved):
            raise CheckpointError(f"cannot resume {self.run_dir}: {saved} is missing")
        try:
            old = read_config(self.run_dir)
        except ValueError as e:
            raise CheckpointError(f"cannot resume {self.run_dir}: {e}") from None
        new = json.loads(json.dumps(self._config_json()))
        free = _RESUME_FREE + (_DATA_SOURCE if old.get("dataset_sha256") == new["dataset_sha256"] else ())
        diff = [k for k in sorted(new) if k not in free and old.get(k) != new[k]]
        if diff:
            raise ValueError(f"cannot resume {self.run_dir}: its run differs from {saved} in " + "; ".join(
                f"{k} (recorded {old.get(k)!r}, given {new[k]!r})" for k in diff))

    def _move_back_aside(self):
        """A kill while a copy's real checkpoint/ directory was being replaced by the link left it in
        checkpoint.old with no `checkpoint`: it is the committed epoch, moved back."""
        aside = os.path.join(self.run_dir, _MOVED_ASIDE)
        if not os.path.lexists(self.checkpoint_dir) and os.path.isdir(aside):
            os.replace(aside, self.checkpoint_dir)
            _fsync(self.run_dir)

    def _remove_uncommitted(self):
        """Removes the checkpoint directories other than the committed one (a kill's leftovers)."""
        committed = self._committed_dir() if has_checkpoint(self.run_dir) else None
        for name in os.listdir(self.run_dir):
            path = os.path.join(self.run_dir, name)
            if (_CHECKPOINT_VERSION.fullmatch(name) or name == _MOVED_ASIDE) and path != committed:
                shutil.rmtree(path)

    def save_checkpoint(self):
        """Commits this epoch: weights, state and the metrics so far go into a new directory,
        flushed to disk, then one atomic replace of the link `checkpoint` switches to it."""
        if self.rank != 0:
            return
        name = f"checkpoint-{self.epoch}"
        directory = os.path.join(self.run_dir, name)
        os.makedirs(directory)
        save_weights(self.model, os.path.join(directory, "weights.safetensors"), self.base_seeds)
        base_streams = {k: v.clone() for k, v in self.streams.state_dict().items()}
        if self.world > 1:  # the driver streams' base seeds, as for the model
            base = _DriverStreams(self.config.seed).state_dict()
            base_streams.update({k: v for k, v in base.items() if k.endswith(".seed")})
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": self._torch_rng(), "streams": base_streams}
        torch.save(state, os.path.join(directory, "state.pt"))
        with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
            f.writelines(self.metrics)
        for file in CHECKPOINT_FILES:
            _fsync(os.path.join(directory, file))
        _fsync(directory)
        if not os.path.islink(self.checkpoint_dir) and os.path.isdir(self.checkpoint_dir):
            # a copy's real directory (cp -rL): no rename replaces a directory by a link, so it goes aside first
            os.replace(self.checkpoint_dir, os.path.join(self.run_dir, _MOVED_ASIDE))
            _fsync(self.run_dir)
        _atomic(self.checkpoint_dir, lambda p: os.symlink(name, p))
        self._remove_uncommitted()

    def _committed_dir(self):
        """The directory the link `checkpoint` points to (read once: a commit meanwhile cannot mix epochs),
        or a copy's real checkpoint/ directory, or that directory moved aside by a commit a kill stopped."""
        if os.path.islink(self.checkpoint_dir):
            return os.path.join(self.run_dir, os.readlink(self.checkpoint_dir))
        if os.path.isdir(self.checkpoint_dir):
            return self.checkpoint_dir
        aside = os.path.join(self.run_dir, _MOVED_ASIDE)
        if not os.path.lexists(self.checkpoint_dir) and os.path.isdir(aside):
            return aside
        raise CheckpointError(f"cannot resume {self.run_dir}: {self.checkpoint_dir} is neither a link to a committed "
                              "checkpoint nor a checkpoint directory")

    def load_checkpoint(self):
        """Restores model, optimiser, scheduler, shuffling, streams, epoch and metrics from the committed
        checkpoint."""
        directory = self._committed_dir()
        paths = {file: os.path.join(directory, file) for file in CHECKPOINT_FILES}
        for path in paths.values():
            if not os.path.isfile(path):
                raise CheckpointError(f"cannot resume {self.run_dir}: {path} is missing")
        cfg = self.config
        load_weights(self.model, paths["weights.safetensors"], self.device,
                     f"{self.run_dir} ({cfg.defense} preset, model {cfg.model})")
        path = paths["state.pt"]
        try:
            state = torch.load(path, weights_only=True, map_location=self.device)
        except Exception as e:  # any bytes may be there (garbage raises KeyError, ...); their own messages mislead
            raise CheckpointError(f"{path} is truncated or not a torch.save file (torch.load raised "
                                  f"{type(e).__name__})") from None
        try:
            self._load_state(state)
        except Exception as e:  # whatever a foreign or damaged state makes the loaders raise
            raise CheckpointError(f"{path} does not hold this run's training state ({type(e).__name__}: {e})") from None
        self.metrics = _read_metrics(paths["metrics.jsonl"])
        if len(self.metrics) != self.epoch:
            raise CheckpointError(f"{paths['metrics.jsonl']} holds {len(self.metrics)} lines, its checkpoint is of "
                                  f"epoch {self.epoch}")

    def _load_state(self, state):
        epoch = state["epoch"]
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        self.streams.load_state_dict(state["streams"])
        torch_rng = {k: v.cpu() for k, v in state["torch_rng"].items()}
        torch.Generator().set_state(torch_rng["cpu"])  # checked here, set when fit starts
        if self.device.type == "cuda":
            torch.Generator(self.device).set_state(torch_rng["cuda"])
        self.epoch = epoch
        if self.world == 1:  # under torchrun each rank's are seeded afresh (rank 0's alone were saved)
            self.torch_rng = torch_rng

    def _torch_rng(self):
        """torch's generators' states now: the CPU one, and the device's on CUDA."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_torch_rng(self, state):
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # ------------------------------------------------------------------ training

    def _batches(self):
        """This rank's batches of one epoch, shuffled by the trainer's generator."""
        n = len(self.data.y_train)
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)
        order = torch.tensor(list(sampler))
        per_rank = self.config.batch_size // self.world
        x, y = self.data.x_train, self.data.y_train
        for start in range(0, len(order), per_rank):
            idx = order[start:start + per_rank]
            yield x[idx].to(self.device), y[idx].to(self.device)

    def _loss(self, logits, y, x):
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        if self.preset.loss is None:
            return nn.functional.cross_entropy(logits, y)
        return self.preset.loss(self.model, logits.float(), y, self.options, teacher_logits)

    def step(self, x, y):
        """One optimiser step on a batch; returns (loss, correct, rows) as tensors (no host sync)."""
        if self.preset.augment is not None:
            x, y = self.preset.augment(x, y, self.options, self.streams.augment)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)
        weight = self.options["adv_weight"] if self.attack is not None else 0.0
        if weight > 0:
            with _crafting(self.model):
                x_adv = self.attack.perturb(x, y)  # crafting needs no MC verdict
        with autocast:
            if weight < 1:
                logits = self.forward(x)
                loss = self._loss(logits, y, x)
            if weight > 0:  # accuracy is then reported on the adversarial batch
                logits = self.forward(x_adv)
                loss = self._loss(logits, y, x_adv) if weight == 1 else (1 - weight) * loss + weight * self._loss(logits, y, x_adv)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.preset.after_step is not None:
            self.preset.after_step(self.model, self.options)
        return loss.detach(), (logits.argmax(1) == y).sum(), y.shape[0]

    @torch.no_grad()
    def test_accuracy(self):
        """Accuracy of one pass in eval mode (the preset's test-time noise on) on the test split."""
        self.model.eval()
        correct = 0
        for start in range(0, len(self.data.y_test), 500):
            x = self.data.x_test[start:start + 500].to(self.device)
            correct += int((self.model(x).argmax(1) == self.data.y_test[start:start + 500].to(self.device)).sum())
        self.model.train()
        return correct / len(self.data.y_test)

    def _progress(self, total):
        """The epoch's bar: drawn on a terminal only, never into a redirected log (disable=None)."""
        from tqdm import tqdm
        return tqdm(total=total, desc=f"{self.config.defense} {self.epoch + 1}/{self.config.epochs}", leave=False,
                    disable=None if self.config.progress and self.rank == 0 else True, unit="batch")

    def fit(self):
        """Trains until config.epochs, checkpointing after every epoch; returns the model. torch's
        generators are the run's meanwhile, the caller's put back after; the run directory's lock is
        released when it returns."""
        self._lock()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                self._set_torch_rng(self.torch_rng)
                self._fit()
                self.torch_rng = self._torch_rng()
        finally:
            self._unlock()
        return self.model

    def _fit(self):
        if self.preset.distill and not self.is_teacher and self.teacher is None:
            self.teacher = self._train_teacher()
        self.model.train()
        per_rank = self.config.batch_size // self.world
        steps = -(-((len(self.data.y_train) + self.world - 1) // self.world) // per_rank)
        while self.epoch < self.config.epochs:
            start, loss_sum, correct, rows = time.perf_counter(), 0.0, 0, 0
            bar = self._progress(steps)
            for i, (x, y) in enumerate(self._batches()):
                loss, right, n = self.step(x, y)
                loss_sum, correct, rows = loss_sum + loss * n, correct + right, rows + n
                bar.update(1)
                if i % 10 == 9 or i == steps - 1:  # a host sync every 10 steps, for the bar only
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{int(correct) / rows:.3f}",
                                    samples_s=f"{rows * self.world / elapsed:.0f}")
            bar.close()
            self.scheduler.step()
            self.epoch += 1
            elapsed = time.perf_counter() - start
            record = {"epoch": self.epoch, "loss": float(loss_sum) / rows, "train_acc": int(correct) / rows,
                      "test_acc": self.test_accuracy(), "samples_per_s": rows * self.world / elapsed,
                      "lr": self.optimizer.param_groups[0]["lr"], "seconds": elapsed}
            self.metrics.append(json.dumps(record) + "\n")
            self.save_checkpoint()
            if self.config.progress and self.rank == 0:  # the line a log keeps of each (committed) epoch
                print(f"{self.config.defense} epoch {self.epoch}/{self.config.epochs}: loss {record['loss']:.4f}, "
                      f"train accuracy {record['train_acc']:.4f}, test accuracy {record['test_acc']:.4f}, "
                      f"{record['samples_per_s']:.0f} samples/s, {elapsed:.1f} s", file=sys.stderr, flush=True)
        self.model.eval()

    def _train_teacher(self):
        """Defensive distillation's teacher: the same architecture trained at temperature T on the
        labels, in run_dir/teacher (resumable like any run)."""
        teacher = Trainer(self.config, self.teacher_dir, dataset=self.data, _teacher_of=self,
                          resume=has_checkpoint(self.teacher_dir))
        model = teacher.fit()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


# config.json's keys that load_model and the commands read, with the JSON types each takes; the
# optional ones are absent in runs of older versions.
_CONFIG_KEYS = {"defense": str, "model": str, "model_options": dict, "options": dict, "seed": int,
                "input_shape": list, "num_classes": int, "dataset": (str, type(None)), "data_root": (str, type(None))}
_CONFIG_OPTIONAL = {"dataset_name": str, "dataset_sha256": str, "model_sha256": (str, type(None)),
                    "model_import_root": (str, type(None))}


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def _json_type(types_):
    return " or ".join(_JSON_NAMES[t] for t in (types_ if isinstance(types_, tuple) else (types_,)))


def read_config(run_dir):
    """run_dir/config.json as a dict, checked: a file that is not JSON, not an object, or lacks or
    mistypes a key the model is rebuilt from raises ValueError naming it."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds {_json_type(type(saved))}, not the object of a run's settings that "
                         "noisekernels train writes")
    missing = [k for k in _CONFIG_KEYS if k not in saved]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not the config.json of a run of noisekernels train")
    for key, types_ in {**_CONFIG_KEYS, **_CONFIG_OPTIONAL}.items():
        value = saved.get(key)
        if key in saved and (not isinstance(value, types_) or isinstance(value, bool)):
            raise ValueError(f"{path}: {key} is {json.dumps(value)}; expected {_json_type(types_)}")
    shape, classes = saved["input_shape"], saved["num_classes"]
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError(f"{path}: input_shape is {json.dumps(shape)}; expected [C, H, W], three integers >= 1")
    if classes < 1:
        raise ValueError(f"{path}: num_classes is {classes}; expected an integer >= 1")
    return saved


def load_model(run_dir, device="cpu", *, model=None):
    """The trained model of a run directory, rebuilt from its config.json and loaded with the
    weights of its last checkpoint, from any working directory.

    Returns (model, preset, config): the model in eval mode on `device`, with the preset's noise in
    place and on or off at test time as the paper evaluates it (its noise streams restored, so
    the noise it draws is the run's own); the defenses.Preset; config.json as a dict (the
    TrainConfig fields, input_shape, num_classes, and the data's provenance: dataset and
    data_root (absolute; dataset None for data given in memory), dataset_name, dataset_sha256 as
    data.Dataset.sha256() gives it; model_sha256 and model_import_root: models.user.provenance).

    A model of your own (model "file.py:ClassName" or "package.module:ClassName") is rebuilt by
    importing its file or module (running its code: load only runs you trust) with the run's
    model_options. A file whose SHA-256 differs from the recorded one raises ValueError naming it,
    before it runs; `model` (a spec, e.g. the file's new place) builds that model instead, its file
    unchecked. Weights come from safetensors; nothing is unpickled. Raises FileNotFoundError for a
    directory without config.json and checkpoint/weights.safetensors, ValueError for a damaged
    config.json or a model that cannot be rebuilt.

        model, preset, config = load_model("runs/rs1")
        probs = noisekernels.ensemble.mc_predict(model, x, 100)  # MC mean over 100 noise draws
    """
    path = os.path.join(run_dir, "config.json")
    weights = os.path.join(run_dir, "checkpoint", "weights.safetensors")
    if not os.path.isfile(path) or not os.path.isfile(weights):
        raise FileNotFoundError(f"{run_dir} is not a run directory (needs config.json and checkpoint/weights.safetensors)")
    saved = read_config(run_dir)
    spec, root = (model, None) if model is not None else (saved["model"], saved.get("model_import_root"))
    if model is None:
        change = zoo.user.source_change(spec, saved.get("model_sha256"), root)
        if change:
            raise ValueError(f"{run_dir}: {change} (recorded in {path}); pass the model explicitly (--model SPEC, "
                             "load_model(..., model=SPEC)) to use it anyway")
    shape = tuple(saved["input_shape"])
    info = types.SimpleNamespace(shape=shape, num_classes=saved["num_classes"], mean=(0.0,) * shape[0],
                                 std=(1.0,) * shape[0])  # the real values are buffers in the weights
    try:
        with zoo.user.first_on_path(root):
            built, preset, _ = defenses.build(saved["defense"], info, model=spec, model_options=saved["model_options"],
                                              options=saved["options"], seed=saved["seed"])
    except ValueError as e:
        raise ValueError(f"{run_dir}: cannot rebuild the model of {path}: {e}") from None
    load_weights(built, weights, device, f"{run_dir} ({saved['defense']} preset, model {spec}"
                 + (")" if model is not None else " in its config.json)"))
    return built.to(device).eval(), preset, saved


def train_replicas(config, run_dir, k, **kwargs):
    """k models of one scheme with seeds seed, seed+1, ... in run_dir/replica-i (surrogates for the
    multi-surrogate attack); returns them."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"replicas must be an int >= 1, got {k!r}")
    if k == 1:
        return [Trainer(config, run_dir, **kwargs).fit()]
    return [Trainer(dataclasses.replace(config, seed=config.seed + i), os.path.join(run_dir, f"replica-{i}"),
                    **kwargs).fit() for i in range(k)]


__all__ = ["CheckpointError", "RunDirectoryLocked", "SCHEDULES", "TrainConfig", "Trainer", "has_checkpoint",
           "load_model", "load_weights", "read_config", "save_weights", "train_replicas"]
