"""--config FILE: keys are options, flags override, the resolved config lands beside the output."""

import yaml
import zarr
from click.testing import CliRunner
from helpers import write_file_cohort

from mrhscale.cli import main
from mrhscale.stores import open_subject


def test_config_supplies_options_flags_override_and_resolved_written(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    out = tmp_path / "c.zarr"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "ingest": {"manifest": man, "out": str(out), "chunks": "4,4,4", "scheduler": "synchronous", "quiet": True,
                   "checksums": False},
        "patches": {"target": "af"},  # one file may configure several stages
    }))
    r = CliRunner().invoke(main, ["ingest", "--config", str(cfg), "--chunks", "5,5,5"])
    assert r.exit_code == 0, r.output
    ds = open_subject(str(out), "s01")
    assert ds.mri.data.chunksize[:3] == (5, 4, 4)  # flag beat the file: 10x8x12 cut evenly by at most 5
    resolved = zarr.open_group(str(out), mode="r", use_consolidated=False)["_config"].attrs["resolved"]["ingest"]
    assert resolved["command"] == "ingest" and resolved["chunks"] == "5,5,5"
    assert resolved["checksums"] is False and resolved["scheduler"] == "synchronous"
    assert "sources" not in ds.attrs or all("checksum" not in v for v in ds.attrs["sources"].values())
    # the store's resolved config reruns the stage as it is
    r = CliRunner().invoke(main, ["ingest", "--config", str(out)])
    assert r.exit_code == 0 and "skipped: s01" in r.output


def test_config_errors(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("colour: red\n")
    r = CliRunner().invoke(main, ["ingest", "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown option(s) for `ingest`: colour" in r.output
    r = CliRunner().invoke(main, ["ingest", "--config", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2
    cfg.write_text("[1, 2]\n")
    r = CliRunner().invoke(main, ["ingest", "--config", str(cfg)])
    assert r.exit_code == 2 and "mapping" in r.output


def test_resolved_config_masks_credentials():
    from mrhscale.io.config import resolved_config

    doc = resolved_config("ingest", {"out": "x", "storage_options": '{"endpoint_url": "http://h:1", "key": "AK", "secret": "S"}'})
    assert doc["storage_options"] == {"endpoint_url": "http://h:1", "key": "***", "secret": "***"}
    doc = resolved_config("ingest", {"storage_options": {"client_kwargs": {"aws_secret_access_key": "S"}}})
    assert doc["storage_options"]["client_kwargs"]["aws_secret_access_key"] == "***"
