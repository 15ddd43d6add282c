"""`noisekernels train | eval | attack | certify | audit | bench | demo | reproduce` (also `python -m noisekernels ...`).

Each subcommand is one function registered with @command: it declares its arguments on the
parser it is given and returns the function that runs them, so adding a subcommand is one small
function. Every command writes under a run directory (checkpoints, JSON metrics, PNG plots).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

COMMANDS = {}


def command(help):
    """Registers `fn(parser) -> run(args)` as the subcommand named after fn (minus a trailing _)."""
    def register(fn):
        COMMANDS[fn.__name__.rstrip("_").replace("_", "-")] = (help, fn)
        return fn
    return register


class UsageError(ValueError):
    """A bad command-line argument (printed as the command's usage error)."""


# ----------------------------------------------------------------------------- argument helpers

def _value(text):
    """key=value values: JSON (numbers, true/false, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items, flag):
    from .defenses import option_value
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes key=value, got {item!r}")
        out[key] = option_value(_value(value))
    return out


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _common(parser, run_dir=True, threads=None, seed="seed of weights, noise streams and shuffling"):
    if run_dir:
        parser.add_argument("--run-dir", help="where the run's files go")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=threads,
                        help="torch intra-op threads (default: " + (str(threads) if threads else "torch's") + ")")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed} (default 0)")


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    # The library's noise comes from its streams; a user's model may also draw from torch's own
    # generators (nn.Dropout, torch.randn): seeded too, so a command repeats with its --seed (train's
    # runs own their generators: the Trainer seeds and checkpoints them).
    if args.seed is not None:
        torch.manual_seed(args.seed)


def _override_args(parser):
    parser.add_argument("--dataset", help="test on this dataset instead of the one the runs recorded: a bundled name "
                                          "or a .npz file (for data that moved, or runs trained on data in memory)")
    parser.add_argument("--data-root", help="the directory of the dataset's files (mnist, fashion-mnist, cifar10), "
                                            "instead of the recorded one")
    parser.add_argument("--model", help="rebuild the runs' model from this class (path/to/file.py:ClassName or "
                                        "package.module:ClassName) instead of the recorded one: a model file that "
                                        "moved, or one changed since training (then a warning says so)")


def _models_args(parser):
    parser.add_argument("runs", nargs="+", help="run directories of trained models (noisekernels train --run-dir)")
    parser.add_argument("--limit", type=_positive_int, help="evaluate on the first LIMIT test inputs (default: all)")
    parser.add_argument("--out", help="where results and plots go (default: the run directory, or the runs' "
                                      "common parent for several)")
    _override_args(parser)


def _recorded_data(loaded, root):
    """The dataset the runs recorded (one for all), read from `root` where given."""
    from . import data
    sources = {(r.config["dataset"], r.config["data_root"]) for r in loaded}
    if len(sources) > 1:
        raise UsageError(f"the runs use different datasets: {sorted(sources, key=str)}; pass --dataset to test all "
                         "on one")
    (name, recorded_root), run, saved = sources.pop(), loaded[0].path, loaded[0].config
    if name is None:
        raise UsageError(f"{run} was trained on data given in memory ({saved.get('dataset_name')!r}, sha256 "
                         f"{saved.get('dataset_sha256')}): pass the same data with --dataset PATH.npz, or a bundled "
                         "name (with --data-root DIR for mnist, fashion-mnist, cifar10)")
    try:
        return data.load(name, recorded_root if root is None else root)
    except data.DatasetError as e:
        raise UsageError(f"{e}\n  (the data {run} was trained on; if it moved, pass --dataset PATH or --data-root DIR)")


def _test_data(args, loaded):
    """(dataset, what the results record of it): the runs' test data, the dataset they recorded or
    the one --dataset / --data-root name, checked against the SHA-256 each run recorded: a mismatch
    is refused, unless it is data the user named explicitly (then a warning says so)."""
    from . import data
    explicit = args.dataset is not None or args.data_root is not None
    ds = data.load(args.dataset, args.data_root) if args.dataset is not None else _recorded_data(loaded, args.data_root)
    found = ds.sha256()
    for run, saved in ((r.path, r.config) for r in loaded):
        if list(ds.shape) != saved["input_shape"] or ds.num_classes > saved["num_classes"]:
            raise UsageError(f"the data read from {ds.source} has inputs {list(ds.shape)} and {ds.num_classes} "
                             f"classes; {run} takes inputs {saved['input_shape']} and predicts "
                             f"{saved['num_classes']} classes")
        recorded = saved.get("dataset_sha256")  # absent in runs saved before provenance was recorded
        if recorded is None or recorded == found:
            continue
        message = (f"the data read from {ds.source}{' in ' + ds.root if ds.root else ''} (sha256 {found}) is not "
                   f"the data {run} was trained on ({saved['dataset_name']!r}, sha256 {recorded})")
        if not explicit:
            raise UsageError(f"{message}: the file changed or the run was trained on other data; pass --dataset / "
                             "--data-root to test on it anyway")
        print(f"warning: {message}; testing on it as --dataset / --data-root asked", file=sys.stderr)
    return ds, {"dataset": ds.source, "data_root": ds.root, "dataset_name": ds.name, "dataset_sha256": found}


@dataclasses.dataclass
class _Run:
    """A loaded run: its directory, model, preset, config.json, and what the results record of it."""
    path: str
    model: object
    preset: object
    config: dict
    record: dict


def _load_run(run, args):
    """The run at `run` rebuilt (with --model where given: a changed file is then a warning)."""
    from .models import user
    from .train import load_model
    try:
        model, preset, saved = load_model(run, args.device, model=args.model)
    except FileNotFoundError as e:
        raise UsageError(str(e))
    if args.model is None:  # load_model checked the file against the recorded hash
        spec, sha256 = saved["model"], saved.get("model_sha256")
    else:
        change = user.source_change(args.model, saved.get("model_sha256"))
        if change:
            print(f"warning: {run}: {change}; using it as --model asked", file=sys.stderr)
        spec = user.absolute(args.model) if user.is_spec(args.model) else args.model
        sha256 = user.provenance(args.model)["model_sha256"]
    record = {"run": os.path.abspath(run), "defense": preset.name, "model": spec,
              "model_options": saved["model_options"], "model_sha256": sha256}
    return _Run(run, model, preset, saved, record)


def _load_runs(args):
    """(runs, x, y, out, data): the runs loaded, their test inputs and labels (the first --limit),
    where results go, and what the results record of the data."""
    loaded = [_load_run(run, args) for run in args.runs]
    ds, data_record = _test_data(args, loaded)
    x, y = ds.x_test, ds.y_test
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    out = args.out or (args.runs[0] if len(args.runs) == 1 else os.path.commonpath([os.path.abspath(r) for r in args.runs]))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file: give a directory (created if missing) for the results and plots")
    os.makedirs(out, exist_ok=True)
    return loaded, x.to(args.device), y.to(args.device), out, data_record


def _label(run):
    return os.path.basename(os.path.normpath(run))


def _pct(v):
    return f"{100 * v:.1f}"


# ----------------------------------------------------------------------------- train

# train's flags that config.json records, with a new run's defaults (None: the preset's or schedule's)
TRAIN_DEFAULTS = {"defense": "standard", "dataset": "digits", "data_root": None, "model": None, "schedule": "adam",
                  "epochs": None, "batch_size": None, "lr": None, "weight_decay": None, "seed": 0, "device": "cpu",
                  "compile": False, "channels_last": False, "bf16": False}


def _recorded_config(run_dir):
    """The settings run_dir's config.json records ({} where it is missing or unreadable: the
    trainer's resume then says what is wrong with it)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


@command("train a model of a defense preset (checkpoints every epoch; --resume continues a run)")
def train(p):
    from . import data, defenses, models
    from .train import SCHEDULES

    p.add_argument("--defense", choices=defenses.NAMES, help="defense preset (default standard)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a defense option, e.g. --set keep=0.7 "
                   "(see noisekernels.defenses.PRESETS); repeatable")
    p.add_argument("--model", help=f"architecture: one of {', '.join(models.ARCHITECTURES)} (default: the preset's), "
                   "or your own class as path/to/file.py:ClassName or package.module:ClassName (importable), taking "
                   "inputs normalised by the training set's mean and std and returning logits; its constructor gets "
                   f"the --model-option values and, where its signature names them, {', '.join(models.user.FROM_DATA)} "
                   "from the data (defenses dropout, rsd1 and a2snn need a library architecture)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="architecture size or constructor "
                   "argument, e.g. --model-option widths=[16,32] or width=16; repeatable")
    p.add_argument("--dataset", help=f"one of {', '.join(data.NAMES)} (default digits, bundled), "
                   "or a .npz file of arrays x_train, y_train, x_test, y_test (images (N, C, H, W) or (N, H, W), "
                   "uint8 or float in [0, 1]; integer labels 0..K-1)")
    p.add_argument("--data-root", help="directory of the dataset's files (mnist, fashion-mnist, cifar10)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), help="optimiser schedule (default adam)")
    p.add_argument("--epochs", type=int, help="default: the schedule's")
    p.add_argument("--batch-size", type=_positive_int, help="global batch size (default: the schedule's)")
    p.add_argument("--lr", type=_nonnegative_float, help="default: the schedule's")
    p.add_argument("--weight-decay", type=_nonnegative_float, help="default: the schedule's")
    p.add_argument("--replicas", type=_positive_int, default=1, help="train k models with seeds seed..seed+k-1")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint, "
                   "with its recorded settings for every flag not given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn on a terminal only) and no line "
                   "per epoch (stderr)")
    _common(p)
    # None marks a flag not given: --resume takes it from config.json, a new run from TRAIN_DEFAULTS
    p.set_defaults(**{field: None for field in TRAIN_DEFAULTS})

    def run(args):
        from .train import TrainConfig, train_replicas
        run_dir = args.run_dir or os.path.join("runs", args.defense or TRAIN_DEFAULTS["defense"])
        given = {field: getattr(args, field) for field in TRAIN_DEFAULTS}
        given["model_options"] = _pairs(args.model_option, "--model-option") if args.model_option else None
        given["options"] = _pairs(args.set, "--set") if args.set else None
        recorded = _recorded_config(run_dir if args.replicas == 1 else os.path.join(run_dir, "replica-0")) \
            if args.resume else {}
        defaults = {**TRAIN_DEFAULTS, "model_options": {}, "options": {}}
        fields = {field: value if value is not None else recorded.get(field, defaults[field])
                  for field, value in given.items()}
        if args.resume and "dataset" in recorded and fields["dataset"] is None:
            raise UsageError(f"{run_dir} was trained on data given in memory ({recorded.get('dataset_name')!r}): "
                             "pass the same data with --dataset PATH.npz")
        args.device = fields["device"]
        _setup(args)
        config = TrainConfig(**fields, progress=not args.no_progress)
        train_replicas(config, run_dir, args.replicas, resume=args.resume)
        metrics = os.path.join(run_dir if args.replicas == 1 else os.path.join(run_dir, "replica-0"), "metrics.jsonl")
        if os.path.exists(metrics) and os.environ.get("RANK", "0") == "0":
            with open(metrics) as f:
                last = json.loads(f.readlines()[-1])
            print(f"trained {config.defense} in {run_dir}: epoch {last['epoch']}, loss {last['loss']:.4f}, "
                  f"test accuracy {_pct(last['test_acc'])}% (one pass), {last['samples_per_s']:.0f} samples/s")
    return run


# ----------------------------------------------------------------------------- eval, attack, certify

def _progress_args(parser):
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (drawn on a terminal only) and no line per finished stage (stderr)")


def _names(loaded):
    """The runs' names (their directories' names), which key the results: refused where two share one."""
    names = [_label(r.path) for r in loaded]
    for name in names:
        if names.count(name) > 1:
            same = [r.path for r in loaded if _label(r.path) == name]
            raise UsageError(f"runs {same} share the name {name!r}, which keys their results: give them distinct names")
    return names


def _settings(args, x, data, **extra):
    """What every results file records of the command line and the data tested on, beside its own settings."""
    import torch
    return {**extra, "data": data, "seed": args.seed, "inputs": len(x), "limit": args.limit, "device": args.device,
            "threads": torch.get_num_threads()}


def _report(path, settings, runs):
    from . import evaluate
    evaluate.write_json(path, {"settings": settings, "versions": evaluate.versions(), "runs": runs})


def _ns_up_to(n):
    """1, 2, 5, 10, 20, 50, ... below n, and n: the default points of the accuracy-against-n plot."""
    steps = [m * 10 ** e for e in range(len(str(n))) for m in (1, 2, 5)]
    return [v for v in steps if v < n] + [n]


@command("clean accuracy of trained models: noise off, one pass, MC mean and vote over n; accuracy against n")
def eval_(p):
    _models_args(p)
    p.add_argument("--n", type=_positive_int, default=10, help="MC passes (default 10)")
    p.add_argument("--ns", type=_positive_int, nargs="+",
                   help="n values of the accuracy-against-n plot, --n always among them (default: 1, 2, 5, 10, "
                        "20, 50, ... below --n)")
    _progress_args(p)
    _common(p, run_dir=False, seed="recorded only: eval draws from the runs' own noise streams")

    def run(args):
        from . import evaluate
        _setup(args)
        loaded, x, y, out, data = _load_runs(args)
        progress = not args.no_progress
        ns = sorted(set(args.ns or _ns_up_to(args.n)) - {args.n})
        results, curves, rows = {}, {}, []
        for name, run in zip(_names(loaded), loaded):
            start = time.perf_counter()
            with evaluate.progress_bar(4 + len(ns), f"eval {name}", progress) as bar:
                clean = evaluate.clean_accuracy(run.model, x, y, args.n, progress=bar)
                # the point at --n is the table's MC mean
                curves[name] = {**evaluate.accuracy_vs_n(run.model, x, y, ns, progress=bar), args.n: clean["mean"]}
            seconds = time.perf_counter() - start
            summary = [_pct(clean[k]) for k in ("noise_off", "single", "mean", "vote")]
            evaluate.stage_line(f"eval {name}: noise off {summary[0]}%, single {summary[1]}%, MC mean {summary[2]}%, "
                                f"vote {summary[3]}% ({seconds:.1f} s)", progress)
            results[name] = {**run.record, **{k: v.as_dict() for k, v in clean.items()},
                             "accuracy_vs_n": {str(k): v.as_dict() for k, v in sorted(curves[name].items())},
                             "seconds": seconds}
            rows.append([name, run.preset.name] + summary)
        print(evaluate.table(f"clean accuracy (%) on {len(y)} test inputs, MC over n={args.n}",
                     ["model", "defense", "noise off", "single", "MC mean", "vote"], rows))
        settings = _settings(args, x, data, n=args.n, ns=sorted({*ns, args.n}))
        _report(os.path.join(out, "eval.json"), settings, results)
        evaluate.plot(os.path.join(out, "accuracy_vs_n.png"), curves, "n (MC passes)", "accuracy",
                      f"MC mean prediction: accuracy against n ({len(y)} test inputs)", settings=
                      {"seed": args.seed, "bands": "95% Clopper-Pearson"}, xlog=True)
        print(f"wrote {os.path.join(out, 'eval.json')} and accuracy_vs_n.png")
    return run


@command("robust accuracy of trained models under an attack of the library, per eps (shards across torchrun ranks)")
def attack(p):
    from . import evaluate
    from .attacks.base import JUDGE_N
    _models_args(p)
    p.add_argument("--attack", default="PGD", choices=evaluate.attack_names(), help="default PGD")
    p.add_argument("--eps", type=_nonnegative_float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="perturbation budgets (L-inf or L2 radius; for CW the L2 cut-off)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="attack option, e.g. --set steps=10 --set eot=20 --set alpha_ratio=0.25 (alpha = eps * "
                        "ratio); repeatable. AutoAttack's default steps=100 are auto-attack's (Croce & Hein); "
                        "torchattacks' AutoAttack version='rand' runs 10")
    p.add_argument("--judge-n", type=_positive_int, default=JUDGE_N,
                   help=f"MC passes that judge the attack (default {JUDGE_N}, as the attack classes)")
    p.add_argument("--batch-size", type=_positive_int, default=100,
                   help="inputs per batch; batches are dealt to torchrun ranks (default 100)")
    _progress_args(p)
    _common(p, run_dir=False, seed="seed of the attacks' streams (random starts; one per batch)")

    def run(args):
        from . import distributed
        _setup(args)
        options = _pairs(args.set, "--set")
        if "eps" in options:
            raise UsageError("give the budgets with --eps, not --set eps=")
        evaluate.distinct_eps(args.eps)
        rank, world = distributed.init()
        loaded, x, y, out, data = _load_runs(args)
        progress = not args.no_progress and rank == 0
        results, curves, rows = {}, {}, []
        for name, run in zip(_names(loaded), loaded):
            start = time.perf_counter()
            try:
                result = evaluate.robust_accuracy(run.model, x, y, args.attack, args.eps, options, judge_n=args.judge_n,
                                                  seed=args.seed, batch_size=args.batch_size, progress=progress)
            except TypeError as e:
                raise UsageError(f"attack {args.attack}: {e}")
            wall = time.perf_counter() - start
            evaluate.stage_line(f"{args.attack} on {name}: clean {_pct(result.clean)}%, " + ", ".join(
                f"eps {e:g} {_pct(result.robust[e])}%" for e in args.eps) + f" ({wall:.1f} s)", progress)
            if 0.0 in result.robust:  # the clean point stays distinct from the robust accuracy at eps 0
                curves[f"{name} (clean)"] = {0.0: result.clean}
                curves[name] = dict(result.robust)
            else:
                curves[name] = {0.0: result.clean, **result.robust}
            json_result = result.as_json()
            json_result["seconds"]["wall"] = wall
            results[name] = {**run.record, **json_result}
            rows.append([name, run.preset.name, _pct(result.clean)] + [_pct(result.robust[e]) for e in args.eps])
        if rank != 0:
            return
        resolved = {k: v for k, v in evaluate.attack_settings(args.attack, {**options, "judge_n": args.judge_n}).items()
                    if k not in ("eps", "seed")}  # eps: per budget; seed: per batch, from --seed
        if "alpha_ratio" in options:
            resolved["alpha"] = f"eps * {options['alpha_ratio']}"
        judge = f"the MC {resolved['judge']} over {args.judge_n} fresh passes"
        print(evaluate.table(f"robust accuracy (%) under {args.attack} {options} on {len(y)} inputs, judged by {judge}",
                             ["model", "defense", "clean"] + [f"eps={e:g}" for e in args.eps], rows))
        settings = _settings(args, x, data, attack=args.attack, eps=args.eps, options=options, attack_settings=resolved,
                             judge_n=args.judge_n, batch_size=args.batch_size, processes=world)
        _report(os.path.join(out, "attack.json"), settings, results)
        evaluate.plot(os.path.join(out, "robust_accuracy.png"), curves, "eps (0: clean)", "robust accuracy",
                      f"{args.attack}: robust accuracy against eps ({len(y)} inputs)",
                      settings={**options, "judged by": judge, "seed": args.seed})
        print(f"wrote {os.path.join(out, 'attack.json')} and robust_accuracy.png")
    return run


def _certify_budget(args):
    """(estimation samples per input, the settings shown and recorded) as they will run, defaults filled
    in: --N for --method cohen; --n-max with --radius or --tolerance for sequential. A flag of the other
    method is refused."""
    from .certify import TOLERANCE
    if args.radius is not None and args.tolerance is not None:
        raise UsageError("--tolerance applies to the largest radius; --radius asks about one radius only")
    if args.method == "cohen":
        for flag, value in (("--n-max", args.n_max), ("--radius", args.radius), ("--tolerance", args.tolerance)):
            if value is not None:
                raise UsageError(f"{flag} applies to --method sequential; --method cohen takes --N")
        return args.n or 10000, {"N": args.n or 10000}
    if args.n is not None:
        raise UsageError("--N is --method cohen's fixed sample count; --method sequential takes --n-max")
    n_max = args.n_max or 100_000
    if args.radius is None:
        return n_max, {"method": "sequential", "n_max": n_max, "tolerance": TOLERANCE if args.tolerance is None else args.tolerance}
    return n_max, {"method": "sequential", "n_max": n_max, "radius": args.radius}


@command("randomized-smoothing certification (Cohen et al.) of trained models (shards across torchrun ranks)")
def certify(p):
    _models_args(p)
    p.add_argument("--sigma", type=_nonnegative_float, default=0.25, help="smoothing noise std (default 0.25)")
    # --N0 and --N as in locuslab/smoothing's certify.py (a bare --n would also clash with torchrun's flags)
    p.add_argument("--N0", dest="n0", type=_positive_int, default=100, help="selection samples (default 100)")
    p.add_argument("--N", dest="n", type=_positive_int, help="--method cohen: estimation samples (default 10000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--method", default="cohen", choices=("cohen", "sequential"),
                   help="cohen (default): CERTIFY's fixed N; sequential: sampling stops once the answer is clear, "
                        "with the same guarantee (docs/certification.md)")
    p.add_argument("--n-max", type=_positive_int, help="--method sequential: most estimation samples per input "
                                                        "(default 100000)")
    p.add_argument("--radius", type=_nonnegative_float, help="--method sequential: certify this L2 radius or "
                                                             "abstain (default: the largest radius)")
    p.add_argument("--tolerance", type=float, help="--method sequential without --radius: stop once more samples "
                                                   "would add at most this much radius (default 0.05)")
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="noisy copies per forward pass (default 1000)")
    _progress_args(p)
    _common(p, run_dir=False, seed="seed of the smoothing noise (one stream per batch)")

    def run(args):
        from . import certify as smoothing
        from . import distributed, evaluate
        _setup(args)
        rank, world = distributed.init()
        n, budget = _certify_budget(args)
        loaded, x, y, out, data = _load_runs(args)
        progress = not args.no_progress and rank == 0
        shown = {"sigma": args.sigma, "N0": args.n0, **budget, "alpha": args.alpha, "seed": args.seed}
        results, rows = {}, []
        # A run at one radius answers for that radius only: an input it gave up on may hold a smaller one.
        radii = [0.0, 0.25, 0.5, 0.75, 1.0] if args.radius is None else [args.radius]
        for name, run in zip(_names(loaded), loaded):
            start = time.perf_counter()
            per_example = distributed.gather(smoothing.certify_dataset(
                run.model, x, y, args.sigma, args.n0, n, args.alpha, method=args.method, radius=args.radius,
                tolerance=budget.get("tolerance"), batch_size=args.batch_size, seed=args.seed, progress=progress))
            seconds = time.perf_counter() - start
            accuracy = smoothing.certified_accuracy(per_example, radii)
            abstained = int((per_example["prediction"] == smoothing.ABSTAIN).sum())
            samples = per_example["samples"].double().mean().item() if len(y) else 0.0
            evaluate.stage_line(f"certify {name}: " + ", ".join(f"r={r:g} {_pct(a)}%" for r, a in zip(radii, accuracy))
                                + f", {abstained} abstained, {samples:.0f} samples per input ({seconds:.1f} s)", progress)
            results[name] = {**run.record, "certified_accuracy": {str(r): a.as_dict() for r, a in zip(radii, accuracy)},
                             "abstained": abstained, "seconds": seconds, "mean_samples": samples,
                             "examples": {k: v.tolist() for k, v in per_example.items()}}
            rows.append([name, run.preset.name] + [_pct(a) for a in accuracy] + [f"{samples:.0f}"])
            if rank == 0:
                smoothing.plot_certified_accuracy(per_example, os.path.join(out, f"certified_{name}.png"), label=name,
                                                  radius=args.radius,
                                                  title=f"{name}: certified accuracy against L2 radius "
                                                        f"({len(y)} inputs)", settings=shown)
                if args.method == "sequential":
                    smoothing.plot_samples(per_example, os.path.join(out, f"samples_{name}.png"), label=name,
                                           title=f"{name}: noisy samples per input", settings=shown)
        if rank != 0:
            return
        print(evaluate.table(f"certified accuracy (%) at radius, sigma {args.sigma}, n0 {args.n0}, "
                             + ", ".join(f"{k} {v}" for k, v in budget.items())
                             + f", alpha {args.alpha}, {len(y)} inputs",
                             ["model", "defense"] + [f"r={r:g}" for r in radii] + ["samples"], rows))
        _report(os.path.join(out, "certify.json"), _settings(args, x, data, sigma=args.sigma, n0=args.n0, n=n,
                                                             alpha=args.alpha, method=args.method, radius=args.radius,
                                                             tolerance=budget.get("tolerance"), batch_size=args.batch_size,
                                                             processes=world), results)
        print(f"wrote {os.path.join(out, 'certify.json')} and the certified-accuracy plots")
    return run


@command("the adaptive-evaluation checklist of a trained model (Carlini et al. 2019, AutoAttack's checks): "
         "audit.json, audit.md and plots")
def audit(p):
    p.add_argument("run", help="run directory of a trained model (noisekernels train --run-dir)")
    p.add_argument("--eps", type=_positive_float, required=True, help="the perturbation budget (> 0)")
    p.add_argument("--norm", default="Linf", choices=("Linf", "L2"), help="default Linf")
    p.add_argument("--limit", type=_positive_int, help="audit the first LIMIT test inputs (default: all)")
    p.add_argument("--out", help="where audit.json, audit.md and the plots go (default: the run directory)")
    p.add_argument("--steps", type=_positive_int, default=10, help="APGD iterations (check 3 doubles them; default 10)")
    p.add_argument("--eot-cap", type=_positive_int, default=16, help="the largest EOT of the doubling (default 16)")
    p.add_argument("--queries", type=_positive_int, default=100, help="Square's queries (default 100)")
    p.add_argument("--judge-n", type=_positive_int, default=20, help="MC passes of one judgement (default 20)")
    p.add_argument("--judgements", type=_positive_int, default=3,
                   help="independent judgements of every example, >= 3 (default 3)")
    _override_args(p)
    _common(p, run_dir=False, seed="seed of the attacks' streams and of the model's noise during the audit")

    def run(args):
        from .audit import audit as run_audit
        _setup(args)
        args.runs = [args.run]
        loaded, x, y, out, data = _load_runs(args)
        (name,), (trained,) = _names(loaded), loaded
        report = run_audit(trained.model, x, y, args.eps, args.norm, steps=args.steps, eot_cap=args.eot_cap,
                           queries=args.queries, judge_n=args.judge_n, judgements=args.judgements, seed=args.seed)
        plots = report.write(out, f"Audit of {name} ({trained.preset.name})")
        _report(os.path.join(out, "audit.json"), _settings(args, x, data, **report.settings),
                {name: {**trained.record, **report.to_json()}})
        for check in report.checks:
            print(f"{check.verdict:>4}  {check.name}")
        print(f"robust accuracy {_pct(report.robust_accuracy)}% (worst case {_pct(report.robust_accuracy_worst)}%) "
              f"of {len(y)} inputs at {args.norm} eps {args.eps:g}")
        print(f"wrote {os.path.join(out, 'audit.json')}, audit.md and {', '.join(map(os.path.basename, plots))}")
    return run


# ----------------------------------------------------------------------------- bench

@command("the benchmark suite and its report (BENCHMARKS.md, plots); --compare lists ratios that fell; "
         "with run directories, the MC/EOT engine against the loop on trained models")
def bench(p):
    from .benchmarking import run as suite
    p.add_argument("runs", nargs="*", help="run directories of trained models: time the engine on them instead "
                                           "of running the suite")
    p.add_argument("--mode", default="quick", choices=tuple(suite.MODES), help="suite sizes and rounds (default quick)")
    p.add_argument("--select", metavar="EXPR", help="only the suite's benchmarks matching this pytest -k expression")
    p.add_argument("--report-only", metavar="JSON", help="write the report from this JSON run, without running")
    p.add_argument("--compare", metavar="JSON", help="list the ratios of this run that fell against --baseline")
    p.add_argument("--baseline", metavar="JSON", help="the older run for --compare (default: the committed quick "
                                                      "run, docs/benchmarks/quick.json)")
    p.add_argument("--threshold", type=float, default=0.2, help="--compare: the fall that counts (default 0.2)")
    p.add_argument("--out", help="suite: where BENCHMARKS.md, docs/benchmarks/<mode>.json and the plots go "
                                 "(default: the repository root); runs: where bench.json goes")
    p.add_argument("--n", type=_positive_int, default=20, help="runs: draws (default 20)")
    p.add_argument("--batch", type=_positive_int, default=100, help="runs: inputs per batch (default 100)")
    _override_args(p)
    _common(p, run_dir=False, seed="recorded only: the timing draws from the runs' own noise streams")

    def run(args):
        from . import evaluate
        from .benchmarking import compare, report
        if args.compare:
            baseline = args.baseline or os.path.join(suite.REPO, "docs", "benchmarks", "quick.json")
            old, new = compare.load(baseline), compare.load(args.compare)
            fell = compare.regressions(old, new, args.threshold)
            shared = len(compare.ratios(old).keys() & compare.ratios(new).keys())
            print(compare.format_regressions(fell, baseline, args.compare, args.threshold, shared))
            if fell:
                sys.exit(1)
            return
        if not args.runs:
            if args.device != "cpu" or args.seed != 0 or any((args.dataset, args.data_root, args.model)):
                raise UsageError("--device, --seed, --dataset, --data-root and --model apply to run directories; the "
                                 "suite runs on every device it finds, with its own seeds, models and data")
            if args.threads:
                os.environ["OMP_NUM_THREADS"] = str(args.threads)
            out = args.out or suite.REPO
            json_path = args.report_only or os.path.join(out, "docs", "benchmarks", f"{args.mode}.json")
            if not args.report_only:
                command = "noisekernels bench" + ("" if args.mode == "quick" else f" --mode {args.mode}")
                code = suite.run_suite(args.mode, json_path, command=command, select=args.select)
                if code:
                    raise SystemExit(f"the benchmark suite failed (pytest exit code {code}); no report written")
            path = report.write_report(compare.load(json_path), out)
            print(f"wrote {path} and its plots from {json_path}")
            return
        _setup(args)
        args.limit = args.batch
        loaded, x, y, out, data = _load_runs(args)
        results = {name: {**run.record, **evaluate.engine_timing(run.model, x, y, args.n)}
                   for name, run in zip(_names(loaded), loaded)}
        print(evaluate.timing_table(results, len(y)))
        _report(os.path.join(out, "bench.json"), _settings(args, x, data, n=args.n), results)
    return run


# ----------------------------------------------------------------------------- demo

@command("the main job: train six defenses on the bundled digits, evaluate and attack them (PGD-EOT)")
def demo(p):
    p.add_argument("--quick", action="store_true", help="a fast smoke run (few epochs and inputs; for tests)")
    p.add_argument("--epochs", type=_positive_int, help="override every model's epochs")
    p.add_argument("--dataset", default="digits", choices=("digits", "mnist-5k"),
                   help="digits (default: 8x8, a few minutes) or mnist-5k (5,000 real 28x28 MNIST digits, about 25 "
                        "minutes on one thread, most of it training)")
    _common(p, threads=1)  # small models: one thread is fastest (and robust on a loaded machine)

    def run(args):
        from .demo import run_demo
        _setup(args)
        default_dir = "demo" + ("" if args.dataset == "digits" else f"-{args.dataset}") + ("-quick" if args.quick else "")
        run_demo(args.run_dir or os.path.join("runs", default_dir), quick=args.quick,
                 epochs=args.epochs, seed=args.seed, device=args.device, dataset=args.dataset)
    return run


@command("re-run the seed papers' experiments (--list; NAME or all [--full] [--data DIR]; --report)")
def reproduce(p):
    from . import reproduce as experiments
    experiments.add_arguments(p)
    return experiments.command


# ----------------------------------------------------------------------------- entry point

def parser():
    top = argparse.ArgumentParser(prog="noisekernels", description="Train, evaluate and attack stochastic defenses.")
    sub = top.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    runs = {}
    for name, (help, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        runs[name] = (fn(p), p)
    top.set_defaults(_runs=runs)
    return top


def main(argv=None):
    top = parser()
    args = top.parse_args(argv)
    run, sub = args._runs[args.command]
    from .data import DatasetError
    try:
        run(args)
    except (UsageError, DatasetError) as e:
        sub.error(str(e))
    except (ValueError, FileExistsError) as e:  # bad options reach the library's checks: same treatment
        sub.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
