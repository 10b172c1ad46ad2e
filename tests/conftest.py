from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import ServerThread, demo_config


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The built-in demo on a free port, its weights built in a temporary folder."""
    with ServerThread(demo_config(), tmp_path_factory.mktemp("demo")) as server:
        yield server
