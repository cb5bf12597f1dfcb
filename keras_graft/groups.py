"""Which weights graft together: one group per layer with a kernel, with its bias and its normalisation layer.

A normalisation layer (gamma, beta, moving mean, moving variance) belongs to the layer it normalises: the kernel
layer found by walking its input back through layers that keep channels (activations, pooling, dropout). For
filter-level grafting, the layer that consumes the normalised channels (found by walking forward the same way) mixes
its input channel j with channel j's coefficient. A normalisation layer with no such producer (after an Add, say)
and any other layer with weights form groups of their own, informed by their own first weight.
"""

import dataclasses

import keras

from keras_graft import keras_internals
from keras_graft import layouts

_PASSTHROUGH = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Identity,
)


@dataclasses.dataclass
class WeightGroup:
    """Weights mixed with one coefficient (layer level) or one coefficient per filter (filter level).

    Indices refer to ``model.weights``. ``members`` pairs each weight with the axes that index the group's
    filters (None: the weight has no filter axis and takes the group's mean coefficient at filter level).
    """

    name: str
    info_index: int
    info_axes: tuple
    members: list
    gamma_index: int = None
    layer_names: tuple = ()


@dataclasses.dataclass
class GraftStructure:
    """The groups of a model, plus for filter level the input-channel links ``{weight index: (group, axis)}``."""

    groups: list
    input_links: dict
    num_weights: int

    @property
    def grafted_indices(self):
        return sorted(i for g in self.groups for i, _ in g.members)


def _is_float(variable):
    return "float" in str(variable.dtype)


def _first_parent(layer):
    nodes = keras_internals.inbound_nodes(layer)
    if not nodes or len(nodes[0].parent_nodes) != 1:
        return None
    return nodes[0].parent_nodes[0].operation


def _only_consumer(layer):
    nodes = keras_internals.outbound_nodes(layer)
    return nodes[0].operation if len(nodes) == 1 else None


def _producer(norm_layer, previous_layer):
    """The kernel layer whose output ``norm_layer`` normalises, through channel-keeping layers."""
    if not keras_internals.inbound_nodes(norm_layer):
        return previous_layer  # subclassed model: no graph, fall back to model order
    layer = _first_parent(norm_layer)
    while isinstance(layer, _PASSTHROUGH):
        layer = _first_parent(layer)
    return layer if layer is not None and layouts.has_kernel(layer) else None


def _consumer(norm_layer):
    layer = _only_consumer(norm_layer)
    while isinstance(layer, _PASSTHROUGH):
        layer = _only_consumer(layer)
    return layer if layer is not None and layouts.has_kernel(layer) else None


def _select(layers, leaves):
    """A predicate over layers from ``layers``: None (all), a list of names, or a callable."""
    if layers is None:
        return lambda layer: True
    if callable(layers):
        return layers
    names = set([layers] if isinstance(layers, str) else layers)
    unknown = names - {layer.name for layer in leaves}
    if unknown:
        raise ValueError(f"Layers {sorted(unknown)} are not in the model; its layers are "
                         f"{[layer.name for layer in leaves]}.")
    return lambda layer: layer.name in names


def graft_structure(model, layers=None):
    """Groups the float weights of ``model`` for grafting; ``layers`` restricts which layers take part."""
    if not model.built or not model.weights:
        raise ValueError(f"Model '{model.name}' is not built: build it (call it on data or give it an Input) "
                         "before grafting.")
    index = {id(w): i for i, w in enumerate(model.weights)}
    leaves = layouts.flatten_layers(model)
    selected = _select(layers, leaves)

    def members(layer, kernel_layer):
        return [(index[id(w)], layouts.output_axes(kernel_layer, w))
                for w in layer.weights if _is_float(w) and id(w) in index]

    groups, by_layer, norm_owner = [], {}, {}
    previous_kernel_layer = None
    for layer in leaves:
        if layouts.has_kernel(layer) and layer.weights:
            kernel, axes = layouts.primary_kernel(layer)
            group = WeightGroup(layer.name, index[id(kernel)], axes, members(layer, layer),
                                layer_names=(layer.name,))
            groups.append(group)
            by_layer[id(layer)] = group
            previous_kernel_layer = layer
        elif layouts.is_normalization(layer) and layer.weights:
            owner = _producer(layer, previous_kernel_layer)
            group = by_layer.get(id(owner))
            gamma = getattr(layer, "gamma", None)
            channels = layer.weights[0].shape[0]
            if group is not None and layouts.num_filters(owner) == channels:
                group.members += [(i, (0,)) for i, _ in members(layer, layer)]
                group.gamma_index = index[id(gamma)] if gamma is not None else None
                group.layer_names += (layer.name,)
            else:
                info = gamma if gamma is not None else layer.weights[0]
                group = WeightGroup(layer.name, index[id(info)], (0,), [(i, (0,)) for i, _ in members(layer, layer)],
                                    gamma_index=index[id(gamma)] if gamma is not None else None,
                                    layer_names=(layer.name,))
                groups.append(group)
            norm_owner[id(layer)] = (layer, group)
        elif any(_is_float(w) for w in layer.weights):
            info = next(w for w in layer.weights if _is_float(w))
            group = WeightGroup(layer.name, index[id(info)], (-1,), members(layer, layer), layer_names=(layer.name,))
            groups.append(group)

    groups = [g for g in groups if any(selected(layer) for layer in leaves if layer.name in g.layer_names)]
    kept = {id(g) for g in groups}
    input_links = {}
    for layer, group in norm_owner.values():
        consumer = _consumer(layer)
        if consumer is None or id(group) not in kept or layouts.input_axis(consumer) is None:
            continue
        kernel, _ = layouts.primary_kernel(consumer)
        axis = layouts.input_axis(consumer)
        if kernel.shape[axis] == layer.weights[0].shape[0] and id(by_layer.get(id(consumer))) in kept:
            input_links[index[id(kernel)]] = (groups.index(group), axis)
    return GraftStructure(groups, input_links, len(model.weights))
