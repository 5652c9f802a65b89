"""stop.tap: the plugin's options and the service tree."""

import pytest
from twisted.application import service
from twisted.internet.task import Clock
from twisted.python import usage
from zope.interface.verify import verifyObject

from stop import tap
from stop.config import Config
from stop.interfaces import IRecordStore, ISocketLookup


def parse(*argv):
    o = tap.Options()
    o.parseOptions(list(argv))
    return o


def test_no_options_are_the_defaults():
    assert parse()["settings"] == Config()


def test_options_override_the_file(tmp_path):
    conf = tmp_path / "stop.conf"
    conf.write_text("[stop]\nerrors = unknown\nstorage = gzip\nlisten = tcp:9:interface=127.0.0.1\n")
    s = parse("--config", str(conf), "--listen", "tcp:1113:interface=127.0.0.1",
              "--listen", "tcp6:1113:interface=\\:\\:1", "--data-dir", str(tmp_path),
              "--errors", "token")["settings"]
    assert s == Config(listen=("tcp:1113:interface=127.0.0.1", "tcp6:1113:interface=\\:\\:1"),
                       data_dir=str(tmp_path), storage="gzip", errors="token")
    assert parse("--config", str(conf))["settings"].listen == ("tcp:9:interface=127.0.0.1",)


@pytest.mark.parametrize("argv,word", [
    (["--errors", "loud"], "errors"),
    (["--storage", ""], "storage"),
    (["--config", "/nonexistent/stop.conf"], "cannot read config file"),
])
def test_bad_options_are_usage_errors(argv, word):
    with pytest.raises(usage.UsageError, match=word):
        parse(*argv)


def test_unknown_backend_is_a_usage_error(tmp_path):
    o = parse("--storage", "nosuch", "--data-dir", str(tmp_path))
    with pytest.raises(usage.UsageError, match="nosuch"):
        tap.makeService(o, Clock())


def test_build_wires_every_part(tmp_path):
    d = tap.build(Config(listen=("tcp:0:interface=127.0.0.1",), data_dir=str(tmp_path),
                         storage="memory"), Clock())
    verifyObject(ISocketLookup, d.lookup)
    verifyObject(IRecordStore, d.store)
    children = list(d.service)
    assert isinstance(children[0], tap.StoreService)  # opened before any listener
    assert isinstance(children[1], tap.RecursionService)  # stopped before the store
    assert len(children) == 3 and isinstance(d.service, service.MultiService)
    assert d.factory.answerer is d.answerer
