"""stop.tap.build with site plugins: names that are not built in select a
plugin's lookup and store, hooks are wired to the answerer, and syslog is
a service of the tree."""

from __future__ import annotations

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from stop import config, tap, wire
from stop.answer import Query
from stop.hooks import HooksService
from stop.interfaces import ILookupPlugin, IRecordStore, ISocketLookup
from stop.logsetup import SyslogService
from stop import plugins
from stop.model import Endpoint

SITE = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from stop.interfaces import ILookupPlugin, IStorePlugin, IHookPlugin, IRecordHook
from stop.model import Connection, Endpoint

SEEN = []

@implementer(IPlugin, ILookupPlugin)
class Lookup:
    name = "site-lookup"
    def build(self, config, reactor):
        from stop.testing import FakeLookup
        return FakeLookup(Connection(Endpoint("127.0.0.1", 40000), Endpoint("127.0.0.2", 6667),
                                     uid=1000, inode=1, accepted=False))

@implementer(IPlugin, IStorePlugin)
class Store:
    name = "site-store"
    def build(self, config, reactor):
        from stop.testing import HeldStore
        store = HeldStore()
        store.auto = True
        return store

@implementer(IRecordHook)
class Hook:
    name = "site-hook"
    def recordSaved(self, token, record):
        SEEN.append(token)
    def close(self):
        pass

@implementer(IPlugin, IHookPlugin)
class HookPlugin:
    name = "site-hook"
    def build(self, config, reactor):
        return Hook()

lookup, store, hook = Lookup(), Store(), HookPlugin()
'''


def test_build_selects_plugins_and_wires_hooks_and_syslog(tmp_path):
    (tmp_path / "site.py").write_text(SITE)
    settings = config.Config(plugin_dirs=(str(tmp_path),), lookup="site-lookup",
                             storage="site-store", hooks=("site-hook",), syslog=True,
                             syslog_socket=str(tmp_path / "log.sock"),
                             listen=("tcp:0:interface=127.0.0.1",))
    verifyObject(ILookupPlugin, plugins.available(ILookupPlugin, [str(tmp_path)])["site-lookup"])
    daemon = tap.build(settings, Clock())
    verifyObject(ISocketLookup, daemon.lookup)
    verifyObject(IRecordStore, daemon.store)
    assert (daemon.lookup.name, daemon.store.name) == ("fake", "held")
    kinds = [type(s) for s in daemon.service]
    assert SyslogService in kinds and HooksService in kinds
    replies = []
    query = Query(wire.parse_request(b"40000, 6667"), Endpoint("127.0.0.2", 51000),
                  Endpoint("127.0.0.1", 113))
    daemon.answerer.answer(query).addBoth(replies.append)
    [token] = list(daemon.store.saved)
    assert replies == [b"40000, 6667 : USERID : OTHER : " + token.encode() + b"\r\n"]
    site = __import__(plugins.plugin_package(str(tmp_path)).__name__ + ".site",
                      fromlist=["SEEN"])
    assert site.SEEN == [token]


def test_builtin_names_do_not_look_for_plugins(tmp_path):
    settings = config.Config(plugin_dirs=(str(tmp_path / "absent"),), lookup="procfs",
                             storage="memory", listen=("tcp:0:interface=127.0.0.1",))
    daemon = tap.build(settings, Clock())
    assert (daemon.lookup.name, daemon.store.name) == ("procfs", "memory")
    assert SyslogService not in [type(s) for s in daemon.service]


def test_one_factory_with_one_signature_per_backend_kind(tmp_path):
    """lookup, process_backend and storage: each built by one
    ``make_X(config, reactor)``, through plugins.make, for built-in names
    and site plugins alike."""
    import inspect

    from stop import os as os_layer
    from stop import storage
    factories = {"lookup": os_layer.make_lookup, "process_backend": os_layer.make_inspector,
                 "storage": storage.make_storage}
    assert set(factories) == set(plugins.KINDS)
    for factory in factories.values():
        assert list(inspect.signature(factory).parameters) == ["config", "reactor"]
    for table in (os_layer.LOOKUPS, os_layer.INSPECTORS, storage.BUILT_IN):
        for build in table.values():
            assert list(inspect.signature(build).parameters) == ["config", "reactor"]
    clock = Clock()
    built = storage.make_storage(config.Config(storage="gzip", data_dir=str(tmp_path / "d"),
                                               fsync="never"), clock)
    assert (built.name, built.data_dir) == ("gzip", str(tmp_path / "d"))
    (tmp_path / "site.py").write_text(SITE)
    settings = config.Config(plugin_dirs=(str(tmp_path),), lookup="site-lookup",
                             storage="site-store")
    assert factories["lookup"](settings, clock).name == "fake"
    assert factories["storage"](settings, clock).name == "held"
