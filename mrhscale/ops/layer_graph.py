"""A MATLAB layer graph as plain data: what ``io/matlab.py`` reads and ``nn/matlab.py`` converts.

It lives apart from both so the reader (io) and the converter (nn) share one description
without importing each other. Weights stay in MATLAB layout; nothing here knows MRH-Net.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# MATLAB layer classes MRH-Net is built from, by kind.
CLASS_KINDS = {
    "ImageInputLayer": "input",
    "Convolution2DLayer": "conv",
    "ReLULayer": "relu",
    "AdditionLayer": "add",
    "RegressionOutputLayer": "regression",
}
KIND_CLASS = {v: f"nnet.cnn.layer.{k}" for k, v in CLASS_KINDS.items()}


@dataclass
class MatLayer:
    """One layer of a MATLAB layer graph, weights kept in MATLAB layout.

    ``kind`` is input, conv, relu, add or regression, or the MATLAB class name of
    any other layer. ``weights`` is H x W x Cin x Cout (MATLAB drops a trailing
    Cout of 1), ``bias`` 1 x 1 x Cout. ``attrs`` holds the layer's other fields
    (InputSize, FilterSize, Stride, DilationFactor, PaddingMode, PaddingSize,
    NumInputs, Normalization) as plain Python values, and ``class`` when known.
    """

    name: str
    kind: str
    weights: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)


@dataclass
class LayerGraph:
    """Layers plus ``Connections`` as (source, destination) pairs.

    A destination may name an input port (``"add11/in2"``), as MATLAB writes it.
    ``meta`` says how the graph was read (reader, variable, how kinds were known).
    """

    layers: list[MatLayer]
    connections: list[tuple[str, str]]
    meta: dict = field(default_factory=dict)

    def layer(self, name: str) -> MatLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)


def count_parameters(graph: LayerGraph) -> int:
    """Number of learnable values in the graph's layers (weights and biases)."""
    return int(
        sum(np.size(x) for lay in graph.layers for x in (lay.weights, lay.bias) if x is not None)
    )
