"""Progress is a bar on a terminal only: in a log or under SLURM, a line now and then."""

import logging

from mrhscale import log


def test_progress_off_a_terminal_is_a_few_log_lines(monkeypatch, caplog):
    monkeypatch.setattr(log, "on_terminal", lambda: False)
    monkeypatch.setenv("MRHSCALE_PROGRESS_EVERY", "0")
    caplog.set_level(logging.INFO, logger="mrhscale")
    log.logger.propagate = True
    assert list(log.progress(range(3), desc="work", unit="item")) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("work: 3/3 item done") and all("\r" not in m for m in lines)
    caplog.clear()
    monkeypatch.setenv("MRHSCALE_PROGRESS_EVERY", "3600")
    list(log.progress(range(3), desc="short"))  # a short job says nothing
    list(log.progress(range(3), desc="quiet", quiet=True))
    assert caplog.records == []


def test_setup_writes_every_record_to_the_log_file(tmp_path):
    path = tmp_path / "run.log"
    log.setup(quiet=True, log_file=str(path))
    log.note("hello")
    log.logger.debug("details")
    text = path.read_text()
    assert "INFO mrhscale: hello" in text and "DEBUG mrhscale: details" in text
    log.reset()
