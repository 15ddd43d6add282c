"""One preset per defense, as data plus small functions: where its noise goes in a model, which
noise is on at test time, its training loss, what it does to a batch and after a step.

    model, preset, options = defenses.build("rse", dataset)           # paper defaults
    model, preset, options = defenses.build("rs1-adv", dataset, options={"adv_eps": 0.1})

Any preset name + "-adv" adds PGD adversarial training (Madry et al.) to that scheme: RS-1-Adv,
RSE-Adv, ... PNI is trained adversarially as its paper does. Noise placement is the preset's job,
not a model class: it fills the Net's identity slots (input_noise, penultimate) or attaches noise
layers to convs with hooks, and sets each noise layer's `mc` to the preset's test_noise so an MC
evaluation of a trained model runs the paper's noise without flags.
"""

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import nn

from . import models as zoo
from .nn import (AnisotropicNoise, GaussianNoise, LearnableNoise, RandomSpike, add_weight_noise, max_entropy_loss,
                 project_unit_rows_, to_brelu, wca_loss)
from .nn.noise import _NoiseLayer
from .ops.noise_add import gaussian_augment

ADV_SUFFIX = "-adv"
# PGD adversarial training (Madry et al.); alpha None = 2.5 * eps / steps (Madry's rule). adv_weight:
# the loss is (1 - w) * CE(clean) + w * CE(adversarial); PNI uses 0.5 (He et al. 2019).
ADV_OPTIONS = {"adv_eps": 0.1, "adv_alpha": None, "adv_steps": 7, "adv_weight": 1.0}
NOISE_LAYERS = (RandomSpike, _NoiseLayer, AnisotropicNoise)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A defense. apply(model, opts) adds its noise; loss(model, logits, y, opts, teacher_logits)
    is its training loss; augment(x, y, opts, stream) its batch transform; after_step(model, opts)
    what runs after each optimiser step."""

    name: str
    summary: str
    paper: str
    model: str  # default architecture
    options: dict
    test_noise: bool  # noise on at test time (MC prediction), as the paper evaluates it
    apply: Callable = lambda model, opts: None
    loss: Optional[Callable] = None
    augment: Optional[Callable] = None
    after_step: Optional[Callable] = None
    adversarial: bool = False
    distill: bool = False  # train a teacher at temperature T first, then the student on its soft labels
    needs_net: str = ""  # what of the library's Net its placement uses, if any: a user's model is refused


def _convs(model):
    return [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]


def _attach(module, name, layer, before):
    """Adds `layer` as a submodule of `module` (so .to(), state_dict and train/eval reach it) and runs
    it on module's input (before) or output from a hook."""
    module.add_module(name, layer)
    if before:
        module.register_forward_pre_hook(lambda mod, args: (getattr(mod, name)(args[0]), *args[1:]))
    else:
        module.register_forward_hook(lambda mod, args, out: getattr(mod, name)(out))


def _hidden_linears(model):
    return [m for m in model.body.modules() if isinstance(m, nn.Linear)]


def _add_dropout(model, p):
    """Dropout on every hidden dense layer's output (the MNIST CNN's, as random-spiking.txt), or
    before the classifier where the body has no dense layer."""
    linears = _hidden_linears(model)
    if linears:
        for layer in linears:
            _attach(layer, "dropout", zoo.Dropout(p), before=False)
    else:
        _attach(model.classifier, "dropout", zoo.Dropout(p), before=True)


def _apply_rs(model, opts):
    convs = _convs(model)
    if not convs:
        raise ValueError("Random Spiking needs a conv layer in the model")
    _attach(convs[0], "random_spike", RandomSpike(keep=opts["keep"], range=opts["range"]), before=False)


def _apply_rsd(model, opts):
    _apply_rs(model, opts)
    _add_dropout(model, opts["dropout"])


def _apply_rse(model, opts):
    model.input_noise = GaussianNoise(opts["init_sigma"])
    for conv in _convs(model)[1:]:
        _attach(conv, "rse_noise", GaussianNoise(opts["inner_sigma"]), before=True)


def _apply_pni(model, opts):
    if opts["target"] == "weight":
        for layer in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
            add_weight_noise(layer, init=opts["init"])
    elif opts["target"] == "activation":
        for conv in _convs(model):
            _attach(conv, "pni_noise", LearnableNoise((), init=opts["init"]), before=False)
    else:
        raise ValueError(f"option target must be 'weight' or 'activation', got {opts['target']!r}")


def _apply_a2snn(model, opts):
    model.penultimate = AnisotropicNoise(model.classifier.in_features, init_std=opts["init_std"], draw=opts["draw"])


def _a2snn_loss(model, logits, y, opts, teacher_logits):
    # CE - l1 * ME - l2 * WCA (a2snn-anisotropic-noise.txt eq. 1): entropy and alignment are maximised.
    noise = model.penultimate
    ce = nn.functional.cross_entropy(logits, y)
    return ce - opts["lambda_me"] * max_entropy_loss(noise) - opts["lambda_wca"] * wca_loss(noise, model.classifier.weight)


def _a2snn_after_step(model, opts):
    project_unit_rows_(model.classifier)


def _apply_gda(model, opts):
    if opts["brelu"]:
        if not any(type(m) is nn.ReLU for m in model.modules()):
            raise ValueError("option brelu replaces the model's nn.ReLU modules by BReLU, and the model has none "
                             "(functional relu calls cannot be replaced)")
        to_brelu(model, opts["brelu"])


def _gda_augment(x, y, opts, stream):
    # The clean batch plus `copies` noisy copies of it (efficient-defenses-brelu-gda.txt).
    n, sigma = opts["copies"], opts["sigma"]
    xs, ys = gaussian_augment(x, y, n, sigma, stream=stream)
    return torch.cat([x, xs]), torch.cat([y, ys])


def _distill_loss(model, logits, y, opts, teacher_logits):
    """Cross-entropy at temperature T against the labels (teacher) or the teacher's soft labels
    at T (student); the student predicts at T = 1 (Papernot et al.)."""
    t = opts["temperature"]
    if teacher_logits is None:
        return nn.functional.cross_entropy(logits / t, y)
    soft = torch.softmax(teacher_logits / t, dim=1)
    return -(soft * torch.log_softmax(logits / t, dim=1)).sum(1).mean()


_DENSE = ("puts dropout after the hidden dense layers, which it tells from the classifier by the library's "
          "models' separate final nn.Linear (model.classifier)")
PRESETS = {p.name: p for p in [
    Preset("standard", "no defense", "-", "mnist-cnn", {}, False),
    Preset("dropout", "dropout on the dense layers", "random-spiking.txt", "mnist-cnn", {"p": 0.5}, False,
           apply=lambda model, opts: _add_dropout(model, opts["p"]), needs_net=_DENSE),
    # keep, not p: the probability a unit is kept (dropout's p is the probability it is dropped).
    Preset("rs1", "Random Spiking after conv1 (keep a unit with probability keep), MC at test",
           "random-spiking.txt 4.2", "mnist-cnn", {"keep": 0.8, "range": "batch"}, True, apply=_apply_rs),
    Preset("rsd1", "RS-1 + dropout on the dense layers", "random-spiking.txt 5", "mnist-cnn",
           {"keep": 0.8, "range": "batch", "dropout": 0.5}, True, apply=_apply_rsd, needs_net=_DENSE),
    Preset("rse", "Gaussian noise on the input (init) and before every inner conv, on at test time",
           "random-self-ensemble.txt", "vgg", {"init_sigma": 0.2, "inner_sigma": 0.1}, True, apply=_apply_rse),
    Preset("pni", "learnable noise scale on weights (or activations), trained adversarially", "He et al. 2019 (PNI)",
           "resnet18", {"target": "weight", "init": 0.25, **ADV_OPTIONS, "adv_weight": 0.5}, True,
           apply=_apply_pni, adversarial=True),
    Preset("a2snn", "anisotropic learned noise at the penultimate layer, CE - l1*ME - l2*WCA, unit rows",
           "a2snn-anisotropic-noise.txt (Table 7, F-MNIST)", "lenet++",
           {"lambda_me": 0.1, "lambda_wca": 0.5, "init_std": 1.0, "draw": "sample"}, True,
           apply=_apply_a2snn, loss=_a2snn_loss, after_step=_a2snn_after_step,
           needs_net="puts its noise on the penultimate features and projects the classifier's rows, so it needs "
                     "the separate penultimate slot and final nn.Linear (model.classifier) of the library's models"),
    Preset("gda", "Gaussian data augmentation (N noisy copies), optional BReLU(t)", "efficient-defenses-brelu-gda.txt",
           "mnist-cnn", {"copies": 10, "sigma": 0.3, "brelu": 0.0}, False, apply=_apply_gda, augment=_gda_augment),
    Preset("distill", "defensive distillation at temperature T", "Papernot et al. (T=100 random-spiking, 40 RSE)",
           "mnist-cnn", {"temperature": 100.0}, False, loss=_distill_loss, distill=True),
]}
NAMES = tuple(PRESETS) + tuple(n + ADV_SUFFIX for n in PRESETS if not PRESETS[n].adversarial)


def get(name):
    """The preset `name`: one of PRESETS, or any non-adversarial one + "-adv" (e.g. "rs1-adv")."""
    if name in PRESETS:
        return PRESETS[name]
    base = name[:-len(ADV_SUFFIX)] if isinstance(name, str) and name.endswith(ADV_SUFFIX) else None
    if base in PRESETS and not PRESETS[base].adversarial:
        p = PRESETS[base]
        return dataclasses.replace(p, name=name, summary=p.summary + " + PGD adversarial training",
                                   options={**p.options, **ADV_OPTIONS}, adversarial=True)
    raise ValueError(f"defense must be one of {NAMES}, got {name!r}")


# Options that are probabilities (Random Spiking's keep, dropout's p and rsd1's dropout).
PROBABILITY_OPTIONS = ("keep", "p", "dropout")
# Options renamed since runs were first saved: the old name gets an error that names the new one.
RENAMED_OPTIONS = {"rs1": {"p": "keep"}, "rsd1": {"p": "keep"}}


def _check_option(key, value, default):
    if default is None or isinstance(default, float):
        if value is None and default is None:
            return None
        if key in PROBABILITY_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"option {key} must be a probability in [0, 1], got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"option {key} must be a finite number >= 0, got {value!r}")
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"option {key} must be an int >= 1, got {value!r}")
        return value
    if not isinstance(value, type(default)):
        raise ValueError(f"option {key} must be a {type(default).__name__}, got {value!r}")
    return value


def resolve_options(preset, options=None):
    """The preset's defaults updated by `options`; unknown keys and bad values are clear errors."""
    options = dict(options or {})
    base = preset.name[:-len(ADV_SUFFIX)] if preset.name.endswith(ADV_SUFFIX) else preset.name
    for old, new in RENAMED_OPTIONS.get(base, {}).items():
        if old in options:
            raise ValueError(f"option {old} of defense {preset.name!r} is now called {new} (the probability a unit is "
                             f"kept, the opposite of dropout's p): use {new}={options[old]!r}")
    unknown = sorted(set(options) - set(preset.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for defense {preset.name!r}; accepted: {sorted(preset.options)}")
    resolved = dict(preset.options)
    for key, value in options.items():
        resolved[key] = _check_option(key, value, preset.options[key])
    if preset.adversarial and resolved["adv_weight"] > 1:
        raise ValueError(f"option adv_weight must be in [0, 1], got {resolved['adv_weight']}")
    if preset.distill and resolved["temperature"] <= 0:
        raise ValueError(f"option temperature must be > 0, got {resolved['temperature']}")
    return resolved


def noise_layers(model):
    return [m for m in model.modules() if isinstance(m, NOISE_LAYERS)]


def set_test_noise(model, on):
    """Noise on (mc=True) or off in eval mode for every noise layer of model."""
    for m in noise_layers(model):
        m.mc = bool(on)
    return model


def option_value(value):
    """An option's value as constructors get it, from the command line and from a run's JSON alike:
    lists (JSON arrays) as tuples, at any depth."""
    if isinstance(value, (list, tuple)):
        return tuple(option_value(v) for v in value)
    if isinstance(value, dict):
        return {k: option_value(v) for k, v in value.items()}
    return value


def build(name, dataset, *, model=None, model_options=None, options=None, seed=0):
    """(model, preset, options): the preset's architecture (or `model`) for `dataset`, with the
    defense's noise added and its test-time noise set as the paper evaluates (noise layers a user's
    model brings itself keep their own setting). Weights and noise seeds
    come from `seed` (torch's global generator is left as it was). Option values go through
    option_value, so a model trained and one rebuilt from config.json get the same ones."""
    preset = get(name)
    model_options = option_value(model_options or {})
    opts = resolve_options(preset, option_value(options or {}))
    if preset.needs_net and zoo.is_user_spec(model):
        raise ValueError(f"defense {name!r} cannot apply to your model {model}: it {preset.needs_net}. Use one of the "
                         f"library's architectures {tuple(zoo.ARCHITECTURES)}, or a defense that acts on the input, "
                         f"convs or weights ({', '.join(n for n, p in PRESETS.items() if not p.needs_net)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = zoo.build(model or preset.model, dataset.shape, dataset.num_classes, dataset.mean, dataset.std,
                        **model_options)
        own = {id(m) for m in noise_layers(net)}  # a user's model's own noise (nk.nn.inject) keeps its setting
        preset.apply(net, opts)
    for m in noise_layers(net):
        if id(m) not in own:
            m.mc = bool(preset.test_noise)
    return net, preset, opts


def weight_decay_groups(model, weight_decay):
    """Optimiser parameter groups: noise parameters (PNI's alpha, A2SNN's L) get no weight decay
    (decay would pull the learned noise scale to zero, PNI section 3.2); the rest get weight_decay."""
    noise_ids = {id(p) for m in noise_layers(model) for p in m.parameters()}
    noise = [p for p in model.parameters() if id(p) in noise_ids]
    rest = [p for p in model.parameters() if id(p) not in noise_ids]
    return [{"params": rest, "weight_decay": weight_decay}, {"params": noise, "weight_decay": 0.0}]


__all__ = ["ADV_OPTIONS", "NAMES", "PRESETS", "Preset", "build", "get", "noise_layers", "option_value",
           "resolve_options", "set_test_noise", "weight_decay_groups"]
