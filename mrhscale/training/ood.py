"""The out-of-distribution score of a trained network, fitted on its training patches
(``ops.ood``): one pass over up to ``OOD_PATCHES`` of the shuffled training split, the
patches normalised exactly as the network saw them. It depends on the data and its
normalisation, not on the weights, so every member of an ensemble gets the same kind of
record (each from its own shuffled sample). ``add_input_distance`` fits it for a bundle
made before mrhscale had it.
"""

from __future__ import annotations

import numpy as np
import torch

from mrhscale.errors import MRHError
from mrhscale.log import logger
from mrhscale.ops.ood import fit_input_distance
from mrhscale.training.data import open_data

BATCH = 1024
OOD_PATCHES = 100_000  # training patches the fit sees at most (its 67 x 67 covariance is settled long before)


def training_input_distance(cfg, rt, store: dict, stream_norm, device: torch.device | None = None) -> dict | None:
    """The score's record from the training split of ``cfg.patches`` (``store``: its attrs;
    None, with a warning, when there are too few patches to fit it)."""
    batch = max(1, min(BATCH, int(store.get("n_train", BATCH))))
    data = open_data(cfg, rt, "train", batch, device or torch.device("cpu"), norm=stream_norm)
    means, n = [], 0
    with torch.no_grad():
        for x, _ in data.batches(0):
            means.append(x.float().mean((-2, -1)).cpu().numpy())
            n += len(means[-1])
            if n >= OOD_PATCHES:
                break
    try:
        return fit_input_distance(np.concatenate(means) if means else np.zeros((0, 0)))
    except ValueError as e:
        logger.warning(f"mrhscale: no out-of-distribution score in this bundle: {e}")
        return None


def add_input_distance(model: str, patches: str | None = None, runtime=None) -> dict:
    """Fit the score for the bundle at ``model`` on its training patches (``patches``: the
    store it was trained on, default: the one its records name) and write it into the
    bundle; returns the record."""
    # here, not at the top: training.api imports training.loop, which imports this module
    from mrhscale.io.bundle import read_bundle, write_bundle
    from mrhscale.stores import resolve
    from mrhscale.training.api import input_normalisation
    from mrhscale.training.config import TrainConfig
    from mrhscale.training.data import read_patch_store_attrs
    from mrhscale.training.loop import Runtime

    model = resolve(model, "model")
    bundle = read_bundle(model)
    prov = bundle.get("provenance") or {}
    patches = patches or prov.get("patches") or (prov.get("config") or {}).get("patches")
    if not patches:
        raise MRHError(f"{model}: its records do not name the patch store it was trained on; give patches=STORE")
    rt = runtime or Runtime(quiet=True, cache="off")
    cfg = TrainConfig(patches=patches, seed=int((prov.get("config") or {}).get("seed", 0)))
    store = read_patch_store_attrs(patches, rt.context())
    norm = input_normalisation((prov.get("config") or {}).get("norm", "global"), store, patches)
    rec = training_input_distance(cfg, rt, store, norm if norm.per_subject else None)
    if rec is None:
        raise MRHError(f"{patches}: too few training patches to fit an out-of-distribution score")
    write_bundle(model, {**bundle, "ood": rec})
    return rec
