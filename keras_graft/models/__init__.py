"""The CIFAR networks of the filter-grafting and RePr papers as Keras functional models (channels-last).

``get("resnet56", num_classes=100)`` builds a network by name; ``available()`` lists the names.
"""
import functools

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
    "wrn28_10": functools.partial(wide_resnet, 28, 10),
}


def available():
    """The names ``get`` accepts, sorted."""
    return sorted(_BUILDERS)


def get(name, **kwargs):
    """Builds the network called ``name`` (see ``available()``); ``kwargs`` go to its builder.

    For example ``get("resnet32", num_classes=100, weight_decay=5e-4)`` or ``get("wrn28_10", dropout=0.3)``.
    """
    try:
        builder = _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(available())}.") from None
    return builder(**kwargs)
