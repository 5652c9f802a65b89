"""Site plugins: [plugin NAME] settings, finding plugins in plugin_dirs with
twisted.plugin, building them, and record hooks (stop.plugins, stop.hooks)."""

from __future__ import annotations

import os
import textwrap

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from stop import config, plugins, wire
from stop.answer import Answerer, Query
from stop.errors import ConfigError
from stop.hooks import Hooks, HooksService
from stop.interfaces import IHookPlugin, IRecordHook, IRecordStore, IStorePlugin
from stop.model import Connection, Endpoint
from stop.storage import make_storage
from stop.testing import FakeAccounts, FakeLookup, HeldStore

# -- settings ---------------------------------------------------------------


def test_plugin_sections_and_plugin_settings():
    values = config.parse(textwrap.dedent("""\
        [stop]
        storage = mine
        hooks = a b
        plugin_dirs = /srv/p1 /srv/p2
        syslog = yes
        syslog_facility = local4
        [plugin mine]
        collector = tcp:host=127.0.0.1:port=9
        Queue = 5
        [plugin a]
        """))
    c = config.Config(**values)
    assert (c.storage, c.hooks, c.plugin_dirs) == ("mine", ("a", "b"), ("/srv/p1", "/srv/p2"))
    assert (c.syslog, c.syslog_facility) == (True, "local4")
    assert c.plugin_options("mine") == {"collector": "tcp:host=127.0.0.1:port=9", "Queue": "5"}
    assert c.plugin_options("a") == {}
    assert c.plugin_options("nosuch") == {}


@pytest.mark.parametrize("text,word", [
    ("[stop]\nplugin_settings = x\n", "plugin_settings"),
    ("[plugin ]\nx = 1\n", "plugin"),
    ("[plugins x]\nx = 1\n", "plugins x"),
    ("[stop]\nsyslog_facility = nosuch\n", "syslog_facility"),
])
def test_bad_plugin_settings_are_named(text, word):
    with pytest.raises(ConfigError) as info:
        config.Config(**config.parse(text))
    assert word in str(info.value)


# -- finding and building ---------------------------------------------------

STORE_PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from stop.interfaces import IStorePlugin, IHookPlugin

@implementer(IPlugin, IStorePlugin)
class P:
    name = "{name}"
    def build(self, config, reactor):
        from stop.testing import HeldStore
        store = HeldStore()
        store.built_with = (config, reactor)
        store.label = {label!r}
        return store

plugin = P()
'''

BAD_PLUGINS = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from stop.errors import ConfigError
from stop.interfaces import IStorePlugin

@implementer(IPlugin, IStorePlugin)
class WrongType:
    name = "wrong-type"
    def build(self, config, reactor):
        return object()

@implementer(IPlugin, IStorePlugin)
class Raises:
    name = "raises"
    def build(self, config, reactor):
        raise RuntimeError("no disk")

@implementer(IPlugin, IStorePlugin)
class BadSetting:
    name = "bad-setting"
    def build(self, config, reactor):
        raise ConfigError("[plugin bad-setting]: x is wrong")

@implementer(IPlugin, IStorePlugin)
class NoName:
    name = None
    def build(self, config, reactor):
        return None

a, b, c, d = WrongType(), Raises(), BadSetting(), NoName()
'''

HOOK_PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from stop.interfaces import IHookPlugin, IRecordHook

@implementer(IRecordHook)
class Hook:
    def __init__(self, name, seen):
        self.name, self.seen = name, seen
    def recordSaved(self, token, record):
        self.seen.append((self.name, token, record))
    def close(self):
        self.seen.append((self.name, "closed"))

SEEN = []

@implementer(IPlugin, IHookPlugin)
class P:
    def __init__(self, name):
        self.name = name
    def build(self, config, reactor):
        return Hook(self.name, SEEN)

first, second = P("first"), P("second")
'''


def write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return str(directory)


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def settings(dirs, **kw):
    return config.Config(plugin_dirs=tuple(dirs), **kw)


def test_finds_plugins_by_name_first_directory_wins(tmp_path, logged):
    d1 = write(tmp_path / "p1", "s1.py", STORE_PLUGIN.format(name="site", label="one"))
    d2 = write(tmp_path / "p2", "s2.py", STORE_PLUGIN.format(name="site", label="two"))
    write(tmp_path / "p2", "s3.py", STORE_PLUGIN.format(name="other", label="three"))
    found = plugins.available(IStorePlugin, [str(tmp_path / "absent"), d1, d2])
    assert sorted(found) == ["other", "site"]
    for plugin in found.values():
        verifyObject(IStorePlugin, plugin)
    clock = Clock()
    store = make_storage(settings([d1, d2], storage="site"), clock)
    verifyObject(IRecordStore, store)
    assert store.label == "one" and store.built_with[1] is clock
    assert any("found first" in str(e.get("log_format", "")) for e in logged)


def test_directory_writable_by_others_is_ignored(tmp_path, logged):
    d = write(tmp_path / "p", "s.py", STORE_PLUGIN.format(name="site", label="x"))
    os.chmod(d, 0o777)
    assert plugins.available(IStorePlugin, [d]) == {}
    assert any("writable by group or others" in str(e.get("log_format", "")) for e in logged)
    os.chmod(d, 0o755)
    assert list(plugins.available(IStorePlugin, [d])) == ["site"]


def test_broken_module_is_logged_and_others_still_load(tmp_path, logged):
    d = write(tmp_path / "p", "good.py", STORE_PLUGIN.format(name="good", label="g"))
    write(tmp_path / "p", "broken.py", "import no_such_module_anywhere\n")
    assert list(plugins.available(IStorePlugin, [d])) == ["good"]
    # twisted.plugin logs it with the legacy log.err: the key is "failure".
    failures = [e.get("log_failure") or e.get("failure") for e in logged]
    assert any(f is not None and "no_such_module_anywhere" in str(f.value) for f in failures)


def test_unknown_plugin_error_names_setting_dirs_and_what_was_found(tmp_path):
    d = write(tmp_path / "p", "s.py", STORE_PLUGIN.format(name="site", label="x"))
    with pytest.raises(ConfigError) as info:
        make_storage(settings([d], storage="sitee"), Clock())
    message = str(info.value)
    assert message.startswith("storage: 'sitee'") and d in message and "site" in message


@pytest.mark.parametrize("name,words", [
    ("wrong-type", ["wrong-type", "does not provide IRecordStore"]),
    ("raises", ["raises", "RuntimeError: no disk"]),
    ("bad-setting", ["[plugin bad-setting]: x is wrong"]),
])
def test_plugins_that_fail_to_build_are_config_errors(tmp_path, name, words):
    d = write(tmp_path / "p", "bad.py", BAD_PLUGINS)
    with pytest.raises(ConfigError) as info:
        make_storage(settings([d], storage=name), Clock())
    for word in words:
        assert word in str(info.value)


def test_nameless_plugin_is_skipped(tmp_path, logged):
    d = write(tmp_path / "p", "bad.py", BAD_PLUGINS)
    assert sorted(plugins.available(IStorePlugin, [d])) == ["bad-setting", "raises", "wrong-type"]
    assert any("has no name" in str(e.get("log_format", "")) for e in logged)


def test_hooks_built_in_configured_order(tmp_path):
    d = write(tmp_path / "h", "hooks.py", HOOK_PLUGIN)
    built = plugins.build_hooks(settings([d], hooks=("second", "first")), Clock())
    assert [h.name for h in built] == ["second", "first"]
    for h in built:
        verifyObject(IRecordHook, h)
    for p in plugins.available(IHookPlugin, [d]).values():
        verifyObject(IHookPlugin, p)
    assert plugins.build_hooks(settings([d]), Clock()) == []
    with pytest.raises(ConfigError, match="hooks: 'third'"):
        plugins.build_hooks(settings([d], hooks=("first", "third")), Clock())


# -- hooks at run time ------------------------------------------------------


class Recorder:
    name = "recorder"

    def __init__(self, result=None):
        self.seen = []
        self.result = result
        self.closed = False

    def recordSaved(self, token, record):
        self.seen.append((token, record))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def close(self):
        self.closed = True


def as_hook(obj):
    from zope.interface import directlyProvides
    directlyProvides(obj, IRecordHook)
    return obj


def test_failing_hooks_are_logged_and_do_not_stop_the_others(logged):
    raising = as_hook(Recorder(RuntimeError("collector down")))
    pending = defer.Deferred()
    slow = as_hook(Recorder(pending))
    failing = as_hook(Recorder(defer.fail(ValueError("bad record"))))
    last = as_hook(Recorder())
    hooks = Hooks([raising, slow, failing, last])
    assert hooks.saved("t1", b"{}") is None  # at once, though one is still pending
    assert [h.seen for h in (raising, slow, failing, last)] == [[("t1", b"{}")]] * 4
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert sorted(type(e["log_failure"].value).__name__ for e in failures) == \
        ["RuntimeError", "ValueError"]
    assert all(e["token"] == "t1" for e in failures)
    pending.callback(None)


def test_hooks_reject_non_hooks_and_close_all():
    with pytest.raises(TypeError):
        Hooks([object()])
    a, b = as_hook(Recorder()), as_hook(Recorder())
    service = HooksService(Hooks([a, b]))
    service.startService()
    done = []
    service.stopService().addCallback(done.append)
    assert done == [None] and a.closed and b.closed


def test_answerer_calls_hooks_with_the_stored_record_and_replies_despite_failure():
    out = Connection(Endpoint("127.0.0.1", 40000), Endpoint("127.0.0.2", 6667), uid=1000,
                     inode=7, accepted=False)
    store = HeldStore()
    good, bad = as_hook(Recorder()), as_hook(Recorder(RuntimeError("boom")))
    clock = Clock()
    answerer = Answerer(config.Config(), FakeLookup(out), store, clock,
                        accounts=FakeAccounts({1000: ("alice", "/home/alice")}), host_name="h1",
                        hooks=Hooks([bad, good]))
    replies = []
    query = Query(wire.parse_request(b"40000, 6667"), Endpoint("127.0.0.2", 51000),
                  Endpoint("127.0.0.1", 113))
    answerer.answer(query).addBoth(replies.append)
    assert replies == [] and good.seen == []  # not before the record is durable
    store.complete()
    [(token, record)] = good.seen
    assert store.saved == {token: record}
    assert replies == [b"40000, 6667 : USERID : OTHER : " + token.encode() + b"\r\n"]
