from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import SERVER_KINDS, Server, ServerThread, WorkersServer, demo_config
from tests.triton_server import TritonProcess


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The built-in demo on a free port, its weights built in a temporary folder."""
    with ServerThread(demo_config(), tmp_path_factory.mktemp("demo")) as server:
        yield server


@pytest.fixture(scope="session")
def demo_workers_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersServer]:
    """The built-in demo with ``workers: 2`` (a supervisor, an engine, two front ends),
    started once for every module that asks for it."""
    with WorkersServer(demo_config(), tmp_path_factory.mktemp("demo-workers")) as server:
        yield server


@pytest.fixture(scope="module", params=SERVER_KINDS)
def demo(request: pytest.FixtureRequest) -> Server:
    """The demo served by each of :data:`SERVER_KINDS` in turn (the tests of a module
    run against one process, then against ``workers: 2``)."""
    name = "demo_server" if request.param == SERVER_KINDS[0] else "demo_workers_server"
    server: Server = request.getfixturevalue(name)
    return server


@pytest.fixture(scope="session")
def triton_process() -> Iterator[TritonProcess]:
    """One real Triton for every module that needs one (a start takes seconds)."""
    with TritonProcess() as server:
        yield server


@pytest.fixture
def triton(triton_process: TritonProcess) -> TritonProcess:
    """The session's Triton, started again (same ports) if a test before killed it."""
    if not triton_process.running:
        triton_process.start()
    return triton_process
