"""inject(model, scheme): adds a defense's noise layers to an existing model without rewriting its
class. Noise modules become submodules of the layer they act on (so .to(), state_dict and
train/eval reach them) and run from forward hooks; weight noise is a parametrization."""

from torch import nn

from .noise import GaussianNoise, WeightNoise, add_weight_noise
from .random_spike import RandomSpike

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _before(module, name, noise):
    module.add_module(name, noise)
    module.register_forward_pre_hook(lambda mod, args: (getattr(mod, name)(args[0]), *args[1:]))


def _after(module, name, noise):
    module.add_module(name, noise)
    module.register_forward_hook(lambda mod, args, out: getattr(mod, name)(out))


# Each scheme's options and their defaults (the papers' values).
SCHEMES = {
    "rse": {"init_sigma": 0.2, "inner_sigma": 0.1, "mc": True},
    "random_spike": {"keep": 0.8, "mc": False},
    "weight_noise": {"init": 0.25, "mc": True},
}


def _has(model, kind):
    return any(isinstance(m, kind) for m in model.modules())


def inject(model, scheme, **options):
    """Adds a defense's noise to `model` in place and returns it.

    "rse": Gaussian noise before every conv, init_sigma (0.2) on the first, inner_sigma (0.1) on
        the rest, on in training and at test (random-self-ensemble.txt).
    "random_spike": RandomSpike(keep) after the first conv, keep = 0.8 (random-spiking.txt 4.2);
        mc=True keeps it on at test (MC Avg / Voting).
    "weight_noise": PNI weight noise on every conv and linear weight (init 0.25), on at test.
    Every scheme takes mc (on in eval mode). A scheme is injected at most once per model, and a
    model without the layers a scheme acts on is an error, never a silent no-op.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    unknown = sorted(set(options) - set(SCHEMES[scheme]))
    if unknown:
        raise TypeError(f"unexpected options {unknown} for scheme {scheme!r}; valid options: {sorted(SCHEMES[scheme])}")
    opts = {**SCHEMES[scheme], **options}
    convs = [m for m in model.modules() if isinstance(m, _CONVS)]
    if scheme == "rse":
        if not convs:
            raise ValueError("scheme 'rse' puts noise before every conv layer, and the model has none")
        if any(hasattr(c, "rse_noise") for c in convs):
            raise ValueError("scheme 'rse' is already injected into this model")
        noises = [GaussianNoise(opts["init_sigma"] if i == 0 else opts["inner_sigma"], mc=opts["mc"])
                  for i in range(len(convs))]  # all validated before the model changes
        for conv, noise in zip(convs, noises):
            _before(conv, "rse_noise", noise)
    elif scheme == "random_spike":
        if not convs:
            raise ValueError("scheme 'random_spike' puts RandomSpike after the first conv layer, and the model has none")
        if _has(model, RandomSpike):
            raise ValueError("the model already has a RandomSpike layer: scheme 'random_spike' would stack a second")
        _after(convs[0], "random_spike", RandomSpike(keep=opts["keep"], mc=opts["mc"]))
    else:
        layers = [m for m in model.modules() if isinstance(m, (*_CONVS, nn.Linear))]
        if not layers:
            raise ValueError("scheme 'weight_noise' acts on conv and linear weights, and the model has none")
        if _has(model, WeightNoise):
            raise ValueError("scheme 'weight_noise' is already injected into this model")
        WeightNoise(init=opts["init"], mc=opts["mc"])  # validates the options before the model changes
        for layer in layers:
            add_weight_noise(layer, init=opts["init"], mc=opts["mc"])
    return model


__all__ = ["inject", "SCHEMES"]
