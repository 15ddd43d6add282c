"""inject(model, scheme): adds a defense's noise layers to an existing model without rewriting its
class. Noise modules become submodules of the layer they act on (so .to(), state_dict and
train/eval reach them) and run from forward hooks; weight noise is a parametrization."""

from torch import nn

from .noise import GaussianNoise, add_weight_noise
from .random_spike import RandomSpike

SCHEMES = ("rse", "random_spike", "weight_noise")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _before(module, name, noise):
    module.add_module(name, noise)
    module.register_forward_pre_hook(lambda mod, args: (getattr(mod, name)(args[0]), *args[1:]))


def _after(module, name, noise):
    module.add_module(name, noise)
    module.register_forward_hook(lambda mod, args, out: getattr(mod, name)(out))


def inject(model, scheme, **options):
    """Adds a defense's noise to `model` in place and returns it.

    "rse": Gaussian noise before every conv, init_sigma (0.2) on the first, inner_sigma (0.1) on
        the rest, on in training and at test (random-self-ensemble.txt).
    "random_spike": RandomSpike(p) after the first conv, p = 0.8 (random-spiking.txt 4.2), with
        mc (False) to keep it on at test.
    "weight_noise": PNI weight noise on every conv and linear layer (init 0.25).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    convs = [m for m in model.modules() if isinstance(m, _CONVS)]
    if scheme == "rse":
        init, inner = options.pop("init_sigma", 0.2), options.pop("inner_sigma", 0.1)
        noises = [GaussianNoise(init if i == 0 else inner, mc=True) for i in range(len(convs))]  # validate first
        _reject(options)
        for conv, noise in zip(convs, noises):
            _before(conv, "rse_noise", noise)
    elif scheme == "random_spike":
        if not convs:
            raise ValueError("scheme 'random_spike' needs a conv layer in the model")
        spike = RandomSpike(p=options.pop("p", 0.8), mc=options.pop("mc", False))
        _reject(options)
        _after(convs[0], "random_spike", spike)
    else:
        layers = [m for m in model.modules() if isinstance(m, (*_CONVS, nn.Linear))]
        init = options.pop("init", 0.25)
        _reject(options)
        for layer in layers:
            add_weight_noise(layer, init=init)
    return model


def _reject(options):
    if options:
        raise TypeError(f"unexpected options for this scheme: {sorted(options)}")


__all__ = ["inject", "SCHEMES"]
