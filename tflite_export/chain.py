"""A Keras model as the chain of layers the builtin-ops exporter plans, or a refusal.

A Sequential model is a chain. So is a functional model in which every layer feeds exactly one
other: it exports exactly as its Sequential twin. Nested models (a frozen base inside a
Sequential, say) are opened into their layers. A branch or a merge is refused, naming the
layer where the chain splits; `--flex` exports any model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import tensorflow as tf

from tflite_export.errors import ExportError

_FLEX_HINT = (
    "the builtin-ops exporter takes Sequential models and functional models whose layers "
    "form a single chain; export with --flex for devices that ship TensorFlow"
)


def layer_chain(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """The model's layers from input to output (no InputLayer), nested models opened."""
    if isinstance(model, tf.keras.Sequential):
        names = [layer.name for layer in model.layers]
    elif getattr(model, "_is_graph_network", False):
        names = _functional_chain(model.get_config())
    else:
        raise ExportError(f"model is a subclassed {type(model).__name__}; {_FLEX_HINT}")
    chain: list[tf.keras.layers.Layer] = []
    for name in names:
        layer = model.get_layer(name)
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        chain.extend(layer_chain(layer) if isinstance(layer, tf.keras.Model) else [layer])
    return chain


def _inbound_layers(node: Any) -> list[str]:
    # A node is a list of [layer_name, node_index, tensor_index, kwargs], one per input.
    return [entry[0] for entry in node]


def _functional_chain(config: dict[str, Any]) -> list[str]:
    """Layer names from the input to the output of a functional model's config."""
    inputs, outputs = config["input_layers"], config["output_layers"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(
            f"model has {len(inputs)} inputs and {len(outputs)} outputs; {_FLEX_HINT} "
            "(one input, one output)"
        )
    consumers: dict[str, list[str]] = defaultdict(list)
    inbound: dict[str, list[str]] = {}
    for layer in config["layers"]:
        nodes = layer["inbound_nodes"]
        inbound[layer["name"]] = [name for node in nodes for name in _inbound_layers(node)]
        for source in inbound[layer["name"]]:
            consumers[source].append(layer["name"])
    current, last = inputs[0][0], outputs[0][0]
    names = [current]
    while True:
        following = consumers[current]
        if len(following) > 1:
            raise ExportError(
                f"the model branches after layer {current!r} (into {', '.join(following)}); "
                + _FLEX_HINT
            )
        if current == last:
            return names
        if not following:
            raise ExportError(f"layer {current!r} leads to no output; " + _FLEX_HINT)
        (current,) = following
        if len(inbound[current]) > 1:
            raise ExportError(
                f"layer {current!r} merges inputs or is called more than once (its inputs: "
                f"{', '.join(inbound[current])}); " + _FLEX_HINT
            )
        names.append(current)
