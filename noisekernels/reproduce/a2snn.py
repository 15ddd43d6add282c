"""a2snn-anisotropic-noise.txt: Table 5 (the ablation: no defense, isotropic / anisotropic noise
with max-entropy or with WCA, and the full model, under FGSM and PGD with EOT 50) and the sanity
checks of section 4.5 through metrics.obfuscation_report."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import metrics
from ..attacks import FGSM, PGD
from .common import Experiment

PAPER = "a2snn-anisotropic-noise.txt"


class _Isotropic(nn.Module):
    """L = s I with s the mean of L's diagonal: isotropic noise of one learned scale."""

    def forward(self, lower):
        return torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device) * lower.diagonal().mean()


def _isotropic(model):
    parametrize.register_parametrization(model.penultimate, "L", _Isotropic())


# label: (preset, options, variant)
ABLATION = {
    "no defense": ("standard", {}, None),
    "isotropic + ME": ("a2snn", {"lambda_wca": 0.0}, ("isotropic", _isotropic)),
    "isotropic + WCA": ("a2snn", {"lambda_me": 0.0}, ("isotropic", _isotropic)),
    "anisotropic + ME": ("a2snn", {"lambda_wca": 0.0}, None),
    "anisotropic + WCA": ("a2snn", {"lambda_me": 0.0}, None),
    "full (anisotropic, ME + WCA)": ("a2snn", {}, None),
}


def run(ctx):
    s = ctx.settings
    x, y = ctx.test_batch(s["n"])
    xc, yc = ctx.test_batch(s["n_clean"])
    eps = s["eps"]
    rows, acc = [], {}
    for label, (defense, options, variant) in ABLATION.items():
        model = ctx.model(defense, model="lenet++", options=options, variant=variant)
        noisy = defense != "standard"
        eot = s["eot"] if noisy else 1
        clean = metrics.accuracy(model, xc, yc, n=s["judge_n"])
        fgsm = FGSM(model, eps=eps, eot=eot, judge_n=s["judge_n"], seed=0)
        fgsm(x, y)
        pgd = PGD(model, eps=eps, alpha=eps / 10, steps=s["pgd_steps"], eot=eot, judge_n=s["judge_n"], seed=0)
        pgd(x, y)
        acc[label] = (clean, 1 - fgsm.success.double().mean().item(), 1 - pgd.success.double().mean().item())
        rows.append([label, *acc[label]])
        ctx.log(f"  {label}: {acc[label]}")
    full = ctx.model("a2snn", model="lenet++")
    report = metrics.obfuscation_report(full, x, y, [eps, 2 * eps], steps=s["pgd_steps"], eot=s["eot"], n=s["judge_n"], seed=0)
    sanity = [[check, "yes" if passed else "no", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in detail.items())]
              for check, (passed, detail) in report.items()]
    tables = [{"title": f"Accuracy: clean / FGSM / PGD (eps {eps:.4f}, PGD {s['pgd_steps']} steps of eps/10, EOT {s['eot']}; "
                        f"judged by MC-{s['judge_n']})",
               "columns": ["model", "clean", "FGSM", "PGD"], "rows": rows},
              {"title": "Section 4.5 sanity checks on the full model (metrics.obfuscation_report; success rates)",
               "columns": ["check", "passed", "detail"], "rows": sanity}]
    full_label = "full (anisotropic, ME + WCA)"
    checks = [
        {"claim": "Table 5: the full model beats no defense under FGSM and PGD (77.5 / 43.9 against 51.7 / 13.3)",
         "held": bool(acc[full_label][1] > acc["no defense"][1] and acc[full_label][2] > acc["no defense"][2]),
         "detail": f"full {acc[full_label][1]:.3f} / {acc[full_label][2]:.3f}, none {acc['no defense'][1]:.3f} / {acc['no defense'][2]:.3f}"},
        {"claim": "Table 5: the full model is the most robust under PGD of the ablation",
         "held": all(acc[full_label][2] >= v[2] for k, v in acc.items()),
         "detail": ", ".join(f"{k} {v[2]:.3f}" for k, v in acc.items())},
        {"claim": "Table 5: clean accuracy stays within 1 point of no defense for every variant (90.5-91.2 vs 90.8)",
         "held": all(abs(v[0] - acc["no defense"][0]) <= 0.01 for v in acc.values()),
         "detail": ", ".join(f"{k} {v[0]:.3f}" for k, v in acc.items())},
        {"claim": "4.5: unbounded PGD reaches 0% accuracy on the full model",
         "held": bool(report["unbounded attack reaches 100%"][0]), "detail": str(report["unbounded attack reaches 100%"][1])},
        {"claim": "4.5: random sampling does not beat gradients",
         "held": bool(report["random sampling does not beat gradients"][0]),
         "detail": str(report["random sampling does not beat gradients"][1])},
    ]
    return {"tables": tables, "checks": checks, "plots": []}


_TINY = {"widths": (8, 16, 32), "embed": 32}
# Digits stand in for the paper's dataset at the default (and quick) scale.
_DEFAULT = {"dataset": "digits", "model_options": _TINY, "epochs": 20, "batch_size": 32, "n": 200, "n_clean": 450,
            "eps": 0.1, "eot": 50, "pgd_steps": 10, "judge_n": 100}
EXPERIMENT = Experiment(
    name="a2snn-table-5", paper=PAPER,
    title="A2SNN, Table 5 and section 4.5: the ablation under FGSM and PGD with EOT 50, and the sanity checks",
    paper_setting=("Fashion-MNIST, LeNet++ with a 32-d layer before the classifier where z ~ N(0, L L^T) is added; loss "
                   "CE - l1*ME - l2*WCA (l1/l2 = 0.1/0.5), unit-norm classifier rows; batch 128, 100 epochs, lr 1e-3; "
                   "one noise sample at test time; FGSM and PGD (step eps/10, 10 steps) with EOT over 50 samples; eps "
                   "stated as 0.3 (section 4.1) and as 8/255 (Table 5 caption). Section 4.5: PGD with eps 255/255 and "
                   "20 steps gives 0%; random sampling (10,000 draws per image) leaves 97%."),
    paper_numbers=("| model | Clean | FGSM | PGD |\n|---|---|---|---|\n| no defense | 90.8 | 51.7 | 13.3 |\n"
                   "| isotropic + ME | 90.7 | 56.1 | 13.7 |\n| isotropic + WCA | 90.8 | 58.4 | 22.7 |\n"
                   "| anisotropic + ME | 91.2 | 62.7 | 15.8 |\n| anisotropic + WCA | 90.5 | 60.2 | 21.5 |\n"
                   "| full | 90.8 | 77.5 | 43.9 |"),
    full_dataset="fashion-mnist",
    settings={
        "smoke": {"dataset": "digits", "model_options": {"widths": (4, 8, 8), "embed": 8}, "epochs": 1, "n": 4,
                  "n_clean": 8, "eps": 0.1, "eot": 2, "pgd_steps": 2, "judge_n": 4},
        "default": _DEFAULT,
        "quick": _DEFAULT,
        "full": {"model_options": {}, "epochs": 100, "schedule": "a2snn-fmnist", "n": 1000, "n_clean": 10000,
                 "eps": 8 / 255, "eot": 50, "pgd_steps": 10, "judge_n": 100},
    },
    choices=("eps: the Table 5 caption's 8/255 at full scale (its no-defense PGD 13.3% fits 8/255, not 0.3); on 8x8 digits "
             "0.1, fixed before any run",
             "ablation: 'with ME' trains CE - 0.1 ME (WCA weight 0), 'with WCA' trains CE - 0.5 WCA (ME weight 0); isotropic "
             "noise constrains L to s I (one learned scale, a parametrization of the same layer)",
             "accuracy is judged by an MC prediction of judge_n passes on fresh noise (the library's honest judgement), "
             "where the paper uses one noise sample",
             "the sanity checks use obfuscation_report: unbounded = PGD eps 1.0, 20 steps; random = one uniform draw in "
             "the eps ball per input (the paper: 10,000)"),
    deviations=lambda s, dataset: ([f"dataset {dataset} instead of Fashion-MNIST"] if dataset != "fashion-mnist" else [])
    + ([f"LeNet++ shrunk to {s['model_options']}, {s['epochs']} epochs of Adam (paper: 100 epochs SGD lr 1e-3)"]
       if s["model_options"] else [])
    + [f"eps {s['eps']:.4f}, {s['n']} attacked inputs"],
    run=run)

EXPERIMENTS = (EXPERIMENT,)
