"""What every experiment shares: its definition (Experiment), the run context (scale, dataset,
trained-model cache, run directory) and the record, tables and plots it writes."""

import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
from typing import Callable

import torch

from .. import data as datasets
from .. import train

SCALES = ("smoke", "quick", "default", "full")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One headline experiment of a paper.

    settings[scale] is the whole budget of a run at that scale, its bundled dataset included
    (settings["dataset"]; smoke: the test suite's few steps; quick: small models on the 8x8 digits;
    default: mnist-5k at the paper's architecture for the MNIST papers, digits standing in for
    CIFAR-10 and Fashion-MNIST; full: the paper's dataset, read from --data, and scale); choices the paper leaves open
    are in `choices`, and `deviations(settings, dataset)` lists where a run differs from the
    paper. run(ctx) returns {"tables": [...], "checks": [...], "plots": [...]}: tables as
    {"title", "columns", "rows"}, checks as {"claim", "held", "detail"} (the paper's qualitative
    direction against our numbers), plots as {"file", "title", "xlabel", "ylabel", "series":
    {label: [[x, y], ...]}}."""

    name: str
    paper: str  # file in shared/papers
    title: str
    paper_setting: str
    paper_numbers: str  # markdown, quoted from the paper
    full_dataset: str  # the paper's dataset (read from --data at full scale)
    settings: dict
    choices: tuple
    deviations: Callable
    run: Callable


class Context:
    """A run of one experiment: its settings, dataset, run directory, and a cache of trained
    models shared by the experiments of one invocation (keyed by everything that defines them)."""

    _models = {}

    def __init__(self, experiment, scale, dataset, models_dir, log=print):
        self.experiment, self.scale, self.data, self.models_dir, self.log = experiment, scale, dataset, models_dir, log
        self.settings = experiment.settings[scale]
        self.trained = []  # (model, seconds) of the models this run trained or loaded

    def test_batch(self, n, offset=0):
        """n test inputs (a fixed slice of the test split)."""
        x, y = self.data.x_test[offset:offset + n], self.data.y_test[offset:offset + n]
        if len(y) < n:
            raise ValueError(f"the test split has {len(self.data.y_test)} inputs, fewer than the {offset + n} asked")
        return x, y

    def half(self, seed):
        """A random half of the training data (random-spiking.txt 5.4: each surrogate's data)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        idx = torch.randperm(len(self.data.y_train), generator=g)[: len(self.data.y_train) // 2]
        return dataclasses.replace(self.data, x_train=self.data.x_train[idx], y_train=self.data.y_train[idx])

    def model(self, defense, *, seed=0, half=False, options=None, model=None, model_options=None, epochs=None,
              schedule=None, variant=None):
        """A model of `defense` trained with the run's budget (the training loop and presets), in
        eval mode; trained once per invocation for each distinct definition. variant: (name,
        prepare) where prepare(model) changes the built model before training (an ablation the
        presets do not offer); such a model is never resumed from disk."""
        s = self.settings
        config = train.TrainConfig(
            defense=defense, dataset=self.data.name, model=model or s.get("model"),
            model_options=dict(s.get("model_options", {}) if model_options is None else model_options),
            options=dict(options or {}), schedule=schedule or s.get("schedule", "adam"),
            epochs=s["epochs"] if epochs is None else epochs, batch_size=s.get("batch_size"), seed=seed,
            progress=False)
        key = json.dumps([dataclasses.asdict(config), half, self.data.name, len(self.data.y_train),
                          variant and variant[0]], sort_keys=True, default=str)
        if key not in Context._models:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            run_dir = os.path.join(self.models_dir, f"{defense}-s{seed}-{digest}")
            if variant is not None:
                run_dir += f"-{variant[0]}-{os.getpid()}-{time.time_ns()}"
            start = time.perf_counter()
            trainer = train.Trainer(config, run_dir, dataset=self.half(seed) if half else self.data,
                                    resume=train.has_checkpoint(run_dir))
            if variant is not None:
                variant[1](trainer.model)
            model_ = trainer.fit().eval()
            for p in model_.parameters():
                p.requires_grad_(False)
            Context._models[key] = model_
            name = f"{defense}{' ' + variant[0] if variant else ''} seed {seed}{' half' if half else ''}"
            self.trained.append((name, time.perf_counter() - start))
        return Context._models[key]


def load_dataset(experiment, scale, data_dir):
    """The scale's bundled dataset unless a data directory is given (then the paper's dataset);
    full needs one."""
    if scale == "full" and data_dir is None:
        raise ValueError(f"--full runs {experiment.name} on {experiment.full_dataset}: pass its directory with --data DIR")
    if data_dir is None:
        return datasets.load(experiment.settings[scale]["dataset"])
    return datasets.load(experiment.full_dataset, data_dir)


def _clean(value):
    """JSON-safe: nan/inf as strings, tensors as lists."""
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def fmt(value, digits=3):
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(table):
    head = "| " + " | ".join(table["columns"]) + " |"
    rule = "|" + "---|" * len(table["columns"])
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join([f"**{table['title']}**", "", head, rule, *rows])


def write_plots(plots, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    files = []
    for p in plots:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, points in p["series"].items():
            pts = [(a, b) for a, b in points if b is not None and not (isinstance(b, float) and math.isnan(b))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_title(p["title"], fontsize=9)
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, p["file"])
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(p["file"])
    return files


def execute(experiment, scale, data_dir, out_root, log=print):
    """Runs `experiment` at `scale`; writes record.json, tables.md and the plots under
    out_root/NAME/TIMESTAMP-SCALE and returns the record."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    dataset = load_dataset(experiment, scale, data_dir)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    out_dir = os.path.join(out_root, experiment.name, f"{stamp}-{scale}")
    # Trained models live in out_root/models (a later run there resumes them instead of training).
    ctx = Context(experiment, scale, dataset, os.path.join(out_root, "models"), log)
    os.makedirs(out_dir, exist_ok=True)
    log(f"[{experiment.name}] {scale} on {dataset.name} -> {out_dir}")
    start, load = time.perf_counter(), os.getloadavg()[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = experiment.run(ctx)
    seconds = time.perf_counter() - start
    plots = write_plots(result.get("plots", []), out_dir)
    record = {
        "name": experiment.name, "paper": experiment.paper, "title": experiment.title, "scale": scale,
        "dataset": dataset.name, "finished": stamp, "seconds": seconds, "threads": torch.get_num_threads(),
        "load_average": [load, os.getloadavg()[0]],  # the machine's 1-minute load at start and end
        "paper_setting": experiment.paper_setting, "paper_numbers": experiment.paper_numbers,
        "settings": experiment.settings[scale], "choices": list(experiment.choices),
        "deviations": experiment.deviations(experiment.settings[scale], dataset.name),
        "models_trained": [{"model": k, "seconds": s} for k, s in ctx.trained],
        "tables": result["tables"], "checks": result["checks"], "plots": plots,
    }
    record = _clean(record)
    with open(os.path.join(out_dir, "record.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write("\n\n".join(markdown_table(t) for t in record["tables"]) + "\n")
    log(f"[{experiment.name}] done in {seconds:.1f} s")
    return record
