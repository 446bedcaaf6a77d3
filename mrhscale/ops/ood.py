"""How unlike the training brains a voxel's MRI is: an out-of-distribution score, pure numpy.

The score is a Mahalanobis distance of the in-plane mean of the voxel's normalised input
patch (its C contrasts, averaged over the P x P patch the network sees) to the training
split's patches, divided by the training patches' median distance: 1 is a typical training
voxel, and the record keeps the training quantiles to read a value against. The patch mean
(not the centre voxel) keeps the MRI's voxel noise out of the distance; the whitening keeps
the contrasts' relations in it, which is where an artefact or a new scanner shows (signal
loss in some volumes and not others matches no tissue), while the backbone's features, trained
to be invariant to what does not predict the stain, barely move there (docs/uncertainty.md,
"Out of distribution"). The ensemble's spread cannot see what all members were never shown;
this score needs no ensemble at all.
"""

from __future__ import annotations

import numpy as np

VARIABLE = "ood"  # its map's name in a prediction store, beside the stains' uncertainties
SHRINKAGE = 1e-3  # of the mean variance, added to the covariance's diagonal: near-constant contrasts
QUANTILES = (50, 90, 99, 99.9)  # of the training patches' scores, kept in the record
METHOD = ("Mahalanobis distance of the patch's in-plane mean of the normalised contrasts to the "
          "training patches (root mean square of the whitened difference), over its training median")


def fit_input_distance(means: np.ndarray) -> dict:
    """The record of the score fitted on ``means`` [N, C]: the training patches' in-plane means
    (normalised as the network sees them)."""
    x = np.asarray(means, np.float64)
    if x.ndim != 2 or len(x) < x.shape[1] + 2:
        raise ValueError(f"an out-of-distribution fit needs more patches than contrasts, got {x.shape}")
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    cov += SHRINKAGE * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
    whiten = np.linalg.cholesky(np.linalg.inv(cov))
    d = _distance(x, mean, whiten)
    scale = float(np.median(d)) or 1.0
    return {"method": METHOD, "n": int(len(x)), "shrinkage": SHRINKAGE, "mean": mean.tolist(),
            "whiten": whiten.tolist(), "scale": scale,
            "training_quantiles": {_key(q): float(np.percentile(d, q) / scale) for q in QUANTILES}}


def input_distance(means: np.ndarray, record: dict) -> np.ndarray:
    """The score of each row of ``means`` [N, C] under ``record`` (1: a typical training voxel)."""
    mean, whiten = np.asarray(record["mean"]), np.asarray(record["whiten"])
    return _distance(np.asarray(means, np.float64), mean, whiten) / float(record["scale"])


def _distance(x: np.ndarray, mean: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    return np.sqrt((((x - mean) @ whiten) ** 2).mean(-1))


def _key(q: float) -> str:
    return f"{q:g}"
