"""efficient-defenses-brelu-gda.txt: Table 1 (ReLU against BReLU under FGSM eps 0.1), Table 2 (the
empirical robustness rho of the minimal incremental FGSM for the plain CNN, GDA+ReLU and
GDA+BReLU) and Table 3 (the mean input-gradient norm of the loss)."""

from torch import nn

from .. import metrics
from ..attacks import FGSM, MinimalFGSM
from .common import Experiment

PAPER = "efficient-defenses-brelu-gda.txt"


class PaperCNN(nn.Sequential):
    """The paper's CNN, Conv2D(64, 8x8) - Conv2D(128, 6x6) - Conv2D(128, 5x5) - Softmax(10), ReLU;
    its strides and padding are not stated, so they are cleverhans' basic CNN's (the model of the
    paper's libraries' MNIST tutorials): 8x8 stride 2 same, 6x6 stride 2 valid, 5x5 valid, which
    takes 28x28 to 1x1. filters scales the widths (64, 128, 128). Built as a user's own model
    (`--model module:Class`), since no preset architecture has these layers."""

    def __init__(self, in_channels, num_classes, filters=64):
        super().__init__(nn.Conv2d(in_channels, filters, 8, stride=2, padding=3), nn.ReLU(),
                         nn.Conv2d(filters, 2 * filters, 6, stride=2), nn.ReLU(),
                         nn.Conv2d(2 * filters, 2 * filters, 5), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * filters, num_classes))


PAPER_CNN = f"{__name__}:PaperCNN"
# label: (preset, options). BReLU without augmentation is the GDA preset with one noiseless copy
# (the batch and an exact duplicate of it: plain training), as the presets offer BReLU through GDA.
MODELS = {
    "CNN + ReLU": ("standard", {}),
    "CNN + BReLU": ("gda", {"copies": 1, "sigma": 0.0, "brelu": 1.0}),
    "GDA + ReLU": ("gda", {}),
    "GDA + BReLU": ("gda", {"brelu": 1.0}),
}


def run(ctx):
    s = ctx.settings
    x, y = ctx.test_batch(s["n"])
    xc, yc = ctx.test_batch(s["n_clean"])
    rows, res = [], {}
    for label, (defense, options) in MODELS.items():
        model = ctx.model(defense, options=options)
        clean = metrics.accuracy(model, xc, yc, mode="single")
        fgsm = FGSM(model, eps=s["eps"], judge_n=1, seed=0)
        fgsm(x, y)
        minimal = MinimalFGSM(model, eps_step=s["eps_step"], eps_max=s["eps_max"], judge_n=1, seed=0)
        x_min = minimal(x, y)
        rho = metrics.empirical_robustness(x, x_min, minimal.success)
        grad = metrics.loss_sensitivity(model, x, y)
        res[label] = {"fgsm": 1 - fgsm.success.double().mean().item(), "rho": rho, "grad": grad}
        rows.append([label, clean, res[label]["fgsm"], rho, f"{int(minimal.success.sum())}/{len(y)}", grad])
        ctx.log(f"  {label}: {res[label]}")
    tables = [{"title": f"Clean accuracy, accuracy under FGSM eps {s['eps']} (T1), rho of the minimal incremental FGSM "
                        f"(step {s['eps_step']}, up to {s['eps_max']}; T2), mean input-gradient norm of the loss (T3)",
               "columns": ["model", "clean", "FGSM acc", "rho", "rho found", "grad norm"], "rows": rows}]
    r = {k: v["rho"] for k, v in res.items()}
    checks = [
        {"claim": "T1: BReLU is more accurate than ReLU under FGSM eps 0.1 (87.74 vs 73.88)",
         "held": bool(res["CNN + BReLU"]["fgsm"] > res["CNN + ReLU"]["fgsm"]),
         "detail": f"{res['CNN + BReLU']['fgsm']:.3f} vs {res['CNN + ReLU']['fgsm']:.3f}"},
        {"claim": "T2: rho grows CNN < GDA+ReLU < GDA+BReLU (0.202 < 0.440 < 0.471)",
         "held": bool(r["CNN + ReLU"] < r["GDA + ReLU"] < r["GDA + BReLU"]),
         "detail": ", ".join(f"{k} {v:.3f}" for k, v in r.items())},
        {"claim": "T3: GDA+ReLU has a smaller input-gradient norm than the CNN (0.0244 vs 0.0609)",
         "held": bool(res["GDA + ReLU"]["grad"] < res["CNN + ReLU"]["grad"]),
         "detail": f"{res['GDA + ReLU']['grad']:.4f} vs {res['CNN + ReLU']['grad']:.4f}"},
    ]
    return {"tables": tables, "checks": checks, "plots": []}


EXPERIMENT = Experiment(
    name="efficient-defenses", paper=PAPER,
    title="Efficient defenses (BReLU, GDA), Tables 1-3: FGSM accuracy, empirical robustness rho, gradient norm",
    paper_setting=("MNIST; CNN Conv(64, 8x8), Conv(128, 6x6), Conv(128, 5x5), softmax; GDA: 10 noisy copies per image, "
                   "sigma 0.3; BReLU t = 1; white-box FGSM eps 0.1; rho = mean |dx| / |x| of FGSM 'crafted incrementally "
                   "with small perturbations, stopping when the prediction changes'; loss sensitivity = mean input-gradient norm."),
    paper_numbers=("Table 1 (FGSM eps 0.1): CNN+ReLU 73.88, CNN+BReLU 87.74. Table 2 (rho): CNN 0.202, VAT 0.308, "
                   "GDA+ReLU 0.440, GDA+BReLU 0.471. Table 3 (gradient norm): CNN 0.0609, GDA+ReLU 0.0244."),
    full_dataset="mnist",
    settings={
        "smoke": {"dataset": "mnist-5k", "model": PAPER_CNN, "model_options": {"filters": 4}, "epochs": 1, "n": 4,
                  "n_clean": 8, "eps": 0.1, "eps_step": 0.1, "eps_max": 0.5},
        "quick": {"dataset": "digits", "model": "mnist-cnn", "model_options": {"widths": (8, 16), "dense": 32},
                  "epochs": 20, "batch_size": 32, "n": 450, "n_clean": 450, "eps": 0.1, "eps_step": 0.01,
                  "eps_max": 1.0},
        "default": {"dataset": "mnist-5k", "model": PAPER_CNN, "model_options": {}, "epochs": 1, "batch_size": 64,
                    "n": 200, "n_clean": 1000, "eps": 0.1, "eps_step": 0.01, "eps_max": 1.0},
        "full": {"model": PAPER_CNN, "model_options": {}, "epochs": 50, "schedule": "cw-mnist", "n": 10000,
                 "n_clean": 10000, "eps": 0.1, "eps_step": 0.01, "eps_max": 1.0},
    },
    choices=("the minimal FGSM takes the gradient sign at x once and grows eps by eps_step until the prediction "
             "changes (ART's minimal FGSM, which the paper's library provides); rho averages over the inputs it fooled",
             "CNN + BReLU is trained by the GDA preset with one noiseless copy (plain training on a duplicated batch)",
             "the CNN's strides and padding (not stated) are cleverhans' basic CNN's: 8x8 stride 2 same, 6x6 stride 2 "
             "valid, 5x5 valid; its training recipe (not stated) is Adam",
             "VAT (Table 2) and the black-box Table 4 are not run"),
    deviations=lambda s, dataset: ([f"dataset {dataset} instead of MNIST" + (
        ": 5,000 real MNIST digits, 4,000 train / 1,000 test" if dataset == "mnist-5k" else "")]
        if dataset != "mnist" else [])
    + ([f"the C&W/MagNet MNIST CNN {s['model_options']} instead of the paper's 8x8/6x6/5x5 conv net (which does not "
        "fit 8x8 inputs)"] if s["model"] != PAPER_CNN else [f"the paper's CNN with widths {s['model_options']}"]
       if s["model_options"] else [])
    + [f"{s['epochs']} epoch(s) of Adam, batch {s.get('batch_size', 64)} (GDA: each batch with its 10 noisy copies); "
       f"{s['n']} attacked inputs"],
    run=run)

EXPERIMENTS = (EXPERIMENT,)
