"""The training loop: a killed run resumes bit for bit (weights, noise streams, shuffling), run
directories and bad settings give clear errors, replicas differ, checkpoints load without pickle."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from noisekernels import data
from noisekernels.train import TrainConfig, Trainer, load_model, train_replicas

TINY = {"widths": (4, 8), "dense": 16}


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


@pytest.fixture(scope="module")
def ds():
    d = data.digits()
    return data.Dataset("digits", d.x_train[:96], d.y_train[:96], d.x_test[:40], d.y_test[:40], 10, d.mean, d.std)


def config(defense, **kw):
    kw.setdefault("options", {"adv_steps": 2} if defense.endswith("-adv") else {})
    kw.setdefault("batch_size", 32)
    return TrainConfig(defense=defense, model="mnist-cnn", model_options=TINY, progress=False, **kw)


def weights(run):
    return load_file(os.path.join(run, "checkpoint", "weights.safetensors"))


class Killed(Exception):
    pass


def kill_in_epoch_3(trainer):
    """The process dies mid-epoch (3 steps an epoch), after epoch 2's checkpoint."""
    step, calls = trainer.step, []

    def dies_in_epoch_3(x, y):
        calls.append(1)
        if len(calls) == 2 * 3 + 2:
            raise Killed
        return step(x, y)

    trainer.step = dies_in_epoch_3
    with pytest.raises(Killed):
        trainer.fit()


# rsd1: spike + dropout streams; gda-adv: the augmentation and attack streams and SGD momentum.
@pytest.mark.parametrize("defense, schedule", [("rsd1", "adam"), ("gda-adv", "cw-mnist")])
def test_killed_run_resumes_bit_for_bit(ds, tmp_path, defense, schedule):
    cfg = config(defense, schedule=schedule, epochs=3)
    if defense == "gda-adv":
        cfg.options.update(copies=2)
    full = str(tmp_path / "full")
    Trainer(cfg, full, dataset=ds).fit()

    killed = str(tmp_path / "killed")
    kill_in_epoch_3(Trainer(cfg, killed, dataset=ds))
    resumed = Trainer(cfg, killed, dataset=ds, resume=True)
    assert resumed.epoch == 2
    resumed.fit()

    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys() and (defense != "rsd1" or any(k.endswith("stream.offset") for k in a))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(os.path.join(full, "checkpoint", "state.pt"), weights_only=True)
    sb = torch.load(os.path.join(killed, "checkpoint", "state.pt"), weights_only=True)
    assert torch.equal(sa["generator"], sb["generator"])
    assert all(torch.equal(sa["streams"][k], sb["streams"][k]) for k in sa["streams"])
    # and the run trained: weights moved away from the initial ones
    fresh = Trainer(cfg, str(tmp_path / "fresh"), dataset=ds).model.state_dict()
    assert not torch.equal(fresh["classifier.weight"], a["classifier.weight"])


def test_uses_no_global_rng(ds, tmp_path):
    state = torch.get_rng_state()
    Trainer(config("rs1", epochs=1), str(tmp_path / "r"), dataset=ds).fit()
    assert torch.equal(torch.get_rng_state(), state)


def test_run_directory_files_and_load(ds, tmp_path):
    run = str(tmp_path / "run")
    model = Trainer(config("rse", epochs=2), run, dataset=ds).fit()
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"loss", "train_acc", "test_acc", "samples_per_s", "lr"} <= set(lines[0])
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["defense"] == "rse" and saved["input_shape"] == [1, 8, 8] and saved["epochs"] == 2
    loaded, preset, _ = load_model(run)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert preset.name == "rse" and loaded.input_noise.mc  # test-time noise restored with the preset


def test_run_directory_errors(ds, tmp_path):
    run = str(tmp_path / "run")
    Trainer(config("standard", epochs=1), run, dataset=ds).fit()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(config("standard", epochs=1), run, dataset=ds)
    with pytest.raises(ValueError, match=r"cannot resume .* differs from .*config.json in lr \(recorded 0.001, "
                                         r"given 0.5\)"):
        Trainer(config("standard", epochs=2, lr=0.5), run, dataset=ds, resume=True)
    more = Trainer(config("standard", epochs=2), run, dataset=ds, resume=True)  # training longer is fine
    assert more.epoch == 1
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("kw, match", [
    (dict(epochs=-1), "epochs must be an int >= 0"), (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(lr=-1.0), "lr must be a float >= 0"), (dict(schedule="cosine"), "schedule must be one of"),
    (dict(defense="magic"), "defense must be one of"), (dict(seed=-3), "seed must be an int"),
])
def test_bad_settings(ds, tmp_path, kw, match):
    defense = kw.pop("defense", "standard")
    with pytest.raises(ValueError, match=match):
        Trainer(config(defense, **kw), str(tmp_path / "r"), dataset=ds)


def test_replicas_differ(ds, tmp_path):
    models = train_replicas(config("standard", epochs=1), str(tmp_path / "rep"), 2, dataset=ds)
    assert len(models) == 2 and os.path.isdir(tmp_path / "rep" / "replica-1" / "checkpoint")
    assert not torch.equal(models[0].classifier.weight, models[1].classifier.weight)
    with pytest.raises(ValueError, match="replicas must be an int >= 1"):
        train_replicas(config("standard"), str(tmp_path / "x"), 0)


def test_channels_last_bf16_step(ds, tmp_path):
    t = Trainer(config("rs1", channels_last=True, bf16=True), str(tmp_path / "r"), dataset=ds)
    losses = [float(t.step(ds.x_train[:32], ds.y_train[:32])[0]) for _ in range(10)]
    assert losses[-1] < losses[0]


def test_distillation_trains_teacher_then_student(ds, tmp_path):
    run = str(tmp_path / "d")
    t = Trainer(config("distill", epochs=1, options={"temperature": 20.0}), run, dataset=ds)
    t.fit()
    assert os.path.isfile(os.path.join(run, "teacher", "checkpoint", "weights.safetensors"))
    assert t.teacher is not None and not torch.equal(t.teacher.classifier.weight, t.model.classifier.weight)


DRAWS_FROM_TORCH = '''
import torch
from torch import nn


class Dropped(nn.Module):
    """Draws from torch's global generator: nn.Dropout and torch.randn_like."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 16), nn.ReLU(), nn.Dropout(0.5),
                               nn.Linear(16, num_classes))

    def forward(self, x):
        return self.f(x + 0.1 * torch.randn_like(x))
'''


@pytest.fixture
def own_model(tmp_path):
    path = tmp_path / "dropped.py"
    path.write_text(DRAWS_FROM_TORCH)
    return TrainConfig(model=f"{path}:Dropped", epochs=3, batch_size=32, progress=False)


def weights_after(trainer):
    trainer.fit()
    return weights(trainer.run_dir)


def test_a_model_drawing_from_torch_generators_trains_reproducibly_leaving_the_callers_state(ds, tmp_path, own_model):
    first = weights_after(Trainer(own_model, str(tmp_path / "a"), dataset=ds))
    torch.manual_seed(1234)  # whatever the caller's generator holds
    state = torch.get_rng_state()
    second = weights_after(Trainer(own_model, str(tmp_path / "b"), dataset=ds))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_model_drawing_from_torch_generators_resumes_bit_for_bit(ds, tmp_path, own_model, device):
    own_model = dataclasses.replace(own_model, device=device)
    full = str(tmp_path / "full")
    Trainer(own_model, full, dataset=ds).fit()
    killed = str(tmp_path / "killed")
    kill_in_epoch_3(Trainer(own_model, killed, dataset=ds))
    torch.rand(100)  # the caller's generator moves on meanwhile
    resumed = Trainer(own_model, killed, dataset=ds, resume=True)
    assert resumed.epoch == 2
    resumed.fit()
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(os.path.join(r, "checkpoint", "state.pt"), weights_only=True) for r in (full, killed))
    assert sa["torch_rng"].keys() == sb["torch_rng"].keys() == ({"cpu", "cuda"} if device == "cuda" else {"cpu"})
    assert all(torch.equal(sa["torch_rng"][k], sb["torch_rng"][k]) for k in sa["torch_rng"])


def test_distillation_resumed_for_more_epochs_keeps_its_teacher(ds, tmp_path):
    run = str(tmp_path / "d")
    Trainer(config("distill", epochs=1, options={"temperature": 20.0}), run, dataset=ds).fit()
    teacher = weights(os.path.join(run, "teacher"))
    resumed = Trainer(config("distill", epochs=2, options={"temperature": 20.0}), run, dataset=ds, resume=True)
    resumed.fit()
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run, "teacher", "metrics.jsonl"))] == [1]
    kept = weights(os.path.join(run, "teacher"))
    assert all(torch.equal(teacher[k], kept[k]) for k in teacher)
