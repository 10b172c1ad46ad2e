"""The supervisor of ``workers: N`` without processes: what a SIGHUP applies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from mandant.workers.supervisor import Supervisor


def test_a_refused_reload_names_the_operators_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor checks a copy of the file; its refusal named the copy (a file in
    a temporary folder the operator never wrote), not the file to mend."""
    config = tmp_path / "mandant.yaml"
    config.write_text("tenants: [{id: acme, api_keys: [not-a-hash]}]\n")
    supervisor = Supervisor(2, 0, "127.0.0.1", 0.0, [], [], config)
    try:
        with caplog.at_level(logging.ERROR):
            supervisor.reload()  # no child started: nothing else to signal
        refusal = caplog.messages[-1]
        assert "configuration reload refused" in refusal
        assert str(config) in refusal and ".checking" not in refusal
        assert not supervisor.applied.exists()
    finally:
        shutil.rmtree(supervisor.applied.parent, ignore_errors=True)
