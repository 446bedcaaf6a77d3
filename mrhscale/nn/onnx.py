"""An exported ONNX graph (``mrhscale export``) run where predict runs a network.

The graph maps raw patches (and, for a per-subject model, the brain's ``offset`` and
``scale``) to raw stain units (and an ensemble's calibrated ``uncertainty``), so predict
feeds it raw patches and leaves its own scalings at identity (``stages.predict_graph``).
Running the file itself, not the bundle it came from, is what checks that the export
and ``predict`` agree. onnxruntime's CPU provider runs it, whatever ``--device`` says.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mrhscale._optional import load as load_extra

INPUT = "mri"  # the graph's patch input; its outputs are listed by the export's record


class OnnxNetwork:
    """``__call__(x [N, C, P, P])`` -> the graph's outputs concatenated along axis 1
    (``[N, T]`` stains, then an ensemble's ``T`` spreads: what ``nn.worker.forward`` gives
    a bundle's ensemble), with ``feeds`` (the graph's other inputs) bound by ``fed``."""

    def __init__(self, path: str, outputs: list[str], threads: int | None = None):
        ort = load_extra("onnxruntime", "predicting with an ONNX export")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads or torch.get_num_threads()), 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.outputs, self.feeds = list(outputs), {}

    def eval(self) -> OnnxNetwork:  # as an nn.Module's, for InferenceModel
        return self

    def fed(self, feeds: dict) -> OnnxNetwork:
        """This network with the graph's other inputs (one brain's statistics) bound; the
        session is shared, so binding per block costs nothing."""
        out = copy.copy(self)
        out.feeds = {k: np.asarray(v, np.float32) for k, v in feeds.items()}
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        got = self.session.run(self.outputs, {INPUT: x.detach().cpu().numpy(), **self.feeds})
        return torch.from_numpy(np.concatenate(got, 1))


def with_feeds(model, feeds: dict | None):
    """``model`` (an ``InferenceModel``, eager, over an ``OnnxNetwork``) with ``feeds`` bound."""
    if not feeds:
        return model
    bound = copy.copy(model)
    bound.model = model.model.fed(feeds)
    return bound
