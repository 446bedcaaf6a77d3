"""stores.patches.RowReader: rows of a patch-store array read past zarr's pipeline where it
can (local store, plain bytes or one Blosc/Zstd codec) give exactly what zarr reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from mrhscale.stores.patches import RowReader, compressors, create_array


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", ZstdCodec(level=1)], ids=str)
def test_direct_reads_equal_zarr(tmp_path, codec):
    url = str(tmp_path / "p.zarr")
    data = np.random.default_rng(0).gamma(2.0, 50.0, (250, 5, 3, 3)).astype(np.float32)
    arr = create_array(url, "train/inputs", data.shape, (64, 5, 3, 3), np.float32,
                       ["patch", "contrast", "row", "col"], codec)
    arr[:] = data[:]
    r = RowReader(zarr.open_array(url, path="train/inputs", mode="r"))
    assert r.direct
    for a, e in [(0, 64), (64, 128), (70, 100), (192, 250), (200, 201)]:
        out = np.full((e - a, 5, 3, 3), np.nan, np.float32)
        r.read(a, e, out)
        assert np.array_equal(out, data[a:e])
    assert r.plain == (codec == "none")
    for ranges in ([(70, 72), (75, 76), (120, 128)], [(192, 193), (249, 250)], [(3, 9)]):
        out = np.full((sum(e - a for a, e in ranges), 5, 3, 3), np.nan, np.float32)
        r.read_ranges(ranges, out)  # several ranges of one chunk, end to end
        assert np.array_equal(out, np.concatenate([data[a:e] for a, e in ranges]))
    os.remove(os.path.join(url, "train", "inputs", "c.1.0.0.0"))  # a chunk never written: the fill value
    out = np.full((10, 5, 3, 3), np.nan, np.float32)
    r.read(70, 80, out)
    assert (out == 0).all()
    out[:] = np.nan
    r.read_ranges([(70, 75), (78, 83)], out)
    assert (out == 0).all()


def test_other_stores_go_through_zarr(tmp_path):
    data = np.arange(40 * 4, dtype=np.int32).reshape(40, 4)
    mem = zarr.create_array({}, shape=data.shape, chunks=(16, 4), dtype=np.int32)
    mem[:] = data
    r = RowReader(mem)
    assert not r.direct
    out = np.empty((10, 4), np.int32)
    r.read(16, 26, out)
    assert np.array_equal(out, data[16:26])
    assert compressors("none") is None and compressors(True) == compressors("lz4")


def test_codec_option_keeps_older_stores_fingerprints():
    from mrhscale.options import PatchOptions

    assert PatchOptions().record()["compress"] is False  # as when --compress was a flag
    assert PatchOptions(compress=True).compress == "lz4" and PatchOptions(compress="lz4").record()["compress"] is True
    assert PatchOptions(compress="zstd").record()["compress"] == "zstd"


def test_mapped_array_is_the_array(tmp_path):
    url = str(tmp_path / "p.zarr")
    data = np.random.default_rng(1).random((3000, 1024), dtype=np.float32)  # 4 KiB rows: whole pages
    arr = create_array(url, "train/inputs", data.shape, (1024, 1024), np.float32, ["patch", "contrast"], "none")
    arr[:] = data
    r = RowReader(zarr.open_array(url, path="train/inputs", mode="r"))
    m = r.mapped()
    assert m.shape == (3072, 1024) and not m.flags.writeable
    assert np.array_equal(m[:3000], data)
    os.remove(os.path.join(url, "train", "inputs", "c.1.0"))
    assert (r.mapped()[1024:2048] == 0).all()
    lz4 = create_array(url, "train/other", (64, 1024), (64, 1024), np.float32, ["patch", "contrast"], "lz4")
    assert RowReader(lz4).mapped() is None  # compressed chunks are read and decoded instead
