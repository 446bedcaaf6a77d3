"""Registration with ANTs: new brains and new histology onto a cohort's grid, subjects in parallel.

MRH-Net left registration to outside tools; mrhscale drives ANTs (the
``antspyx`` wheel, optional extra ``mrhscale[register]``) and never optimises
a transform itself. Three entry points:

- :func:`register_cohort`: every subject of a manifest onto a reference grid
  (a subject of the manifest or a template NIfTI). The transform is estimated
  on one contrast (``fa``, a b0 channel, ``t2`` ...), then applied to every
  contrast (4D files volume by volume, gradient directions rotated by the
  linear part), the mask (nearest neighbour), targets (linear) and labels
  (nearest neighbour). Output: ``OUT/<sid>/*.nii`` (or .nii.gz), ``OUT/<sid>/transforms/``
  and ``OUT/cohort.yaml``, which ``mrhscale ingest`` takes as it is. One Dask
  task per subject.
- :func:`register_histology`: a 3D stain volume onto a subject's MRI with a
  cross-modal metric (Mattes mutual information), to build new targets.
- :func:`to_native` / :func:`to_reference` / :func:`marker_from_file`: map
  volumes with saved transforms (virtual histology back to a subject's own
  space; a new contrast onto the store grid for evaluation).
- :func:`score_landmarks` / :func:`map_points` / :func:`tre`: landmarks through saved
  transforms (moving points take the inverse chain of the image) and their target
  registration error in micrometres (docs/landmarks.md).

Geometry: images are read with nibabel (RAS affine) and handed to ITK with
the LPS origin/spacing/direction computed here, so ITK never re-reads NIfTI
headers and outputs keep the reference's affine exactly.
"""

from __future__ import annotations

from mrhscale.stages.register.ants import (
    ALIASES,
    FORMAT,
    INITS,
    LPS,
    METRICS,
    MISSING_EXTRA,
    PRESETS,
    STAGING,
    TRANSFORM_DIR,
    TRANSFORM_JSON,
    TRANSFORMS,
    ants_module,
    canonical_transform,
)
from mrhscale.stages.register.cohort import register_cohort
from mrhscale.stages.register.geometry import Grid, contrast_names
from mrhscale.stages.register.histology import register_histology
from mrhscale.stages.register.landmarks import map_points, score_landmarks, tre
from mrhscale.stages.register.markers import marker_from_file
from mrhscale.stages.register.transforms import (
    linear_part,
    read_transform_info,
    rotate_bvecs,
    to_native,
    to_reference,
    transforms_for_subject,
)

__all__ = ['ALIASES', 'FORMAT', 'Grid', 'INITS', 'LPS', 'METRICS', 'MISSING_EXTRA', 'PRESETS', 'STAGING', 'TRANSFORMS', 'TRANSFORM_DIR', 'TRANSFORM_JSON', 'ants_module', 'canonical_transform', 'contrast_names', 'linear_part', 'map_points', 'marker_from_file', 'read_transform_info', 'register_cohort', 'register_histology', 'rotate_bvecs', 'score_landmarks', 'to_native', 'to_reference', 'transforms_for_subject', 'tre']
