"""Ingest throughput: `mrhscale ingest` (Dask, 1 and 2 workers) vs single-process nibabel + zarr.

Both sides read the same uncompressed NIfTI files and write the same chunked,
Blosc-zstd-compressed float32 (x, y, z, contrast) array. MB/s counts the
float32 MRI volume (X*Y*Z*C*4 bytes) per second. Default: a half-size grid
(100x64x140, 67 channels, 2 subjects); --full: 200x128x280 (the real grid).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_rows, row, timed  # noqa: E402


def baseline_ingest(manifest: str, out: str, chunks) -> None:
    """What a user would write by hand: load each file fully with nibabel, write with zarr."""
    import nibabel as nib
    import zarr
    from zarr.codecs import BloscCodec

    from mrhscale.io.manifest import load_manifest

    root = zarr.open_group(out, mode="w")
    for s in load_manifest(manifest).subjects:
        parts = []
        for g in s.mri:
            a = nib.load(g.path).get_fdata(dtype=np.float32)
            parts.append(a if a.ndim == 4 else a[..., None])
        mri = np.nan_to_num(np.concatenate(parts, axis=3))
        arr = root.create_array(
            f"{s.id}/mri", shape=mri.shape, dtype="float32", chunks=(*chunks, mri.shape[3]),
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
            dimension_names=["x", "y", "z", "contrast"],
        )
        arr[...] = mri
        for name, path in {"fa": s.fa, **s.targets}.items():
            v = np.nan_to_num(nib.load(path).get_fdata(dtype=np.float32))
            root.create_array(f"{s.id}/{name}", data=v, chunks=chunks,
                              compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
                              dimension_names=["x", "y", "z"])


def run(full: bool = False, repeats: int = 3) -> list[dict]:
    from mrhscale.parallel.cluster import dask_client
    from mrhscale.parallel.context import Context
    from mrhscale.stages.ingest import ingest
    from mrhscale.synth.phantom import make_cohort

    shape = (200, 128, 280) if full else (100, 64, 140)
    n_subjects = 2
    chunks = (64, 32, 64)
    work = tempfile.mkdtemp(prefix="mrh-bench-ingest-")
    try:
        manifest = make_cohort(os.path.join(work, "files"), n_subjects=n_subjects, shape=shape, seed=1,
                               fmt="nii", quiet=True)
        mb = n_subjects * np.prod(shape) * 67 * 4 / 1e6
        out = os.path.join(work, "out.zarr")

        def base():
            shutil.rmtree(out, ignore_errors=True)
            baseline_ingest(manifest, out, chunks)

        t_base, _ = timed(base, repeats)
        rows = []
        for w in (1, 2):
            with dask_client(workers=w, quiet=True) as client:
                def ours():
                    shutil.rmtree(out, ignore_errors=True)
                    ingest(manifest, out, chunks=chunks, checksums=False, ctx=Context(client=client, quiet=True))

                t, _ = timed(ours, repeats, warmup=1)
            rows.append(row(f"ingest MB/s, {w} worker(s)", mb / t, "MB/s", "nibabel+zarr single process",
                            mb / t_base, target=">= 1x baseline" if w == 2 else None,
                            met=(mb / t >= mb / t_base) if w == 2 else None))
        rows.append(row("ingest scaling 2 vs 1 workers", rows[1]["value"] / rows[0]["value"], "x",
                        target="> 1 (grows with workers)", met=rows[1]["value"] > rows[0]["value"]))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print_rows(run(a.full, a.repeats))
