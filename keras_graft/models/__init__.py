"""The CIFAR networks of the filter-grafting and RePr papers as Keras functional models (channels-last).

``get("resnet56", num_classes=100)`` builds a network by name; ``available()`` lists the names, and ``get`` also
takes ``resnet<depth>[_leaky]`` and ``wrn<depth>_<k>`` for other depths and widths.
"""
import functools
import re

from keras_graft.models.convnet import convnet
from keras_graft.models.mobilenetv2 import mobilenet_v2
from keras_graft.models.resnet import NAMED_DEPTHS, ZeroPadShortcut, cifar_resnet
from keras_graft.models.vgg import vgg16_bn
from keras_graft.models.wrn import wide_resnet

__all__ = ["ZeroPadShortcut", "available", "cifar_resnet", "convnet", "get", "mobilenet_v2", "vgg16_bn",
           "wide_resnet"]

_BUILDERS = {
    "convnet3": functools.partial(convnet, 3),
    **{f"resnet{d}": functools.partial(cifar_resnet, d) for d in NAMED_DEPTHS},
    **{f"resnet{d}_leaky": functools.partial(cifar_resnet, d, activation="leaky_relu") for d in NAMED_DEPTHS},
    "mobilenetv2": mobilenet_v2,
    "vgg16_bn": vgg16_bn,
    "wrn28_10": functools.partial(wide_resnet, 28, width=10),
}
_RESNET = re.compile(r"resnet(\d+)(_leaky)?")
_WRN = re.compile(r"wrn(\d+)_(\d+)")


def available():
    """The names ``get`` accepts, sorted."""
    return sorted(_BUILDERS)


def get(name, **kwargs):
    """Builds the network called ``name`` (see ``available()``); ``kwargs`` go to its builder.

    For example ``get("resnet32", num_classes=100, weight_decay=5e-4)``, ``get("wrn28_10", dropout=0.3)``, or
    ``get("resnet8", width=4)`` (any ``resnet<depth>[_leaky]`` or ``wrn<depth>_<k>``; the builder checks the depth).
    """
    builder = _BUILDERS.get(name) if isinstance(name, str) else None
    resnet = _RESNET.fullmatch(name) if isinstance(name, str) else None
    wrn = _WRN.fullmatch(name) if isinstance(name, str) else None
    if builder is None and resnet:
        builder = functools.partial(cifar_resnet, int(resnet.group(1)),
                                    activation="leaky_relu" if resnet.group(2) else "relu")
    elif builder is None and wrn:
        builder = functools.partial(wide_resnet, int(wrn.group(1)), width=int(wrn.group(2)))
    if builder is None:
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(available())} (and resnet<6n+2>[_leaky] "
                         "or wrn<6n+4>_<k> for other depths and widths).")
    return builder(**kwargs)
