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
