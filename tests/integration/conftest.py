import os

import pytest

from tests.integration.harness import Daemon, Pair


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


@pytest.fixture
def start_daemon(tmp_path_factory):
    """start_daemon(settings=None, args=()) -> a running Daemon, stopped after the test."""
    started = []

    def start(settings=None, args=(), **kw):
        d = Daemon(tmp_path_factory.mktemp("stopd"), settings, args, **kw).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon shared by a module's tests (default settings)."""
    d = Daemon(tmp_path_factory.mktemp("stopd")).start()
    yield d
    d.stop()
    assert "Traceback" not in d.read_log(), d.read_log()


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def tree():
    """A tests.integration.svtrees.Tree: processes started detached, stopped
    (by their process groups) after the test."""
    from tests.integration.svtrees import Tree
    t = Tree()
    yield t
    t.stop()
