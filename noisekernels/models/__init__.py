"""The papers' architectures, sized by argument. build(name, shape, num_classes, mean, std, **kw)
returns a Net (layers.py): normalisation inside, identity slots for a preset's noise. A name with
a colon is a user's own class ("path/to/file.py:ClassName", "package.module:ClassName"), built
in a UserNet (user.py)."""

import inspect

from .cnn import lenet_plus, mnist_cnn, vgg
from .layers import Dropout, Net, Normalize
from .resnet import resnet18, wide_resnet
from .user import UserNet
from .user import build as build_user
from .user import is_spec as is_user_spec

ARCHITECTURES = {"mnist-cnn": mnist_cnn, "lenet++": lenet_plus, "resnet18": resnet18, "vgg": vgg,
                 "wide-resnet": wide_resnet}


def build(name, shape, num_classes, mean, std, /, **options):
    """The architecture `name` for inputs of `shape` (C, H, W); options are its sizes (see each
    factory, e.g. mnist_cnn(widths=(32, 64), dense=200), wide_resnet(depth=28, widen=10)), or
    a user's class (user.py) with options its constructor's arguments."""
    if is_user_spec(name):
        return build_user(name, shape, num_classes, mean, std, **options)
    if name not in ARCHITECTURES:
        raise ValueError(f"model must be one of {tuple(ARCHITECTURES)} or a class of your own "
                         f"(path/to/file.py:ClassName or package.module:ClassName), got {name!r}")
    factory = ARCHITECTURES[name]
    allowed = list(inspect.signature(factory).parameters)[2:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; accepted: {allowed}")
    body, features = factory(tuple(shape), num_classes, **options)
    return Net(body, features, num_classes, mean, std)


__all__ = ["ARCHITECTURES", "Dropout", "Net", "Normalize", "UserNet", "build", "is_user_spec", "lenet_plus",
           "mnist_cnn", "resnet18", "vgg", "wide_resnet"]
