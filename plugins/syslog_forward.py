"""Example site plugin "syslog-forward": keep records in a built-in store
and forward each one to a central syslog collector (RFC 5424 over TCP).

Install: copy (or symlink) this file into a plugin directory, by default
/etc/stop/plugins/, then in /etc/stop/stop.conf either

    [stop]
    storage = syslog-forward        # flat store + forwarding
    [plugin syslog-forward]
    collector = tcp:host=192.0.2.9:port=514
    # store = flat                  # the built-in store kept locally

or, with any store, as a record hook:

    [stop]
    hooks = syslog-forward
    [plugin syslog-forward]
    collector = tcp:host=192.0.2.9:port=514

Other settings: queue (records held while the collector is away, default
10000), facility (default daemon), hostname, app_name, sd_id. See
stop-plugins(7). Like every plugin file, this one imports nothing heavy at
module level: the work is in stop.forward, imported when built.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from stop.interfaces import IHookPlugin, IStorePlugin


@implementer(IPlugin, IStorePlugin)
class _ForwardingStorePlugin:
    name = "syslog-forward"

    def build(self, config, reactor):
        from stop.forward import ForwardingStore, forwarder_from_options
        from stop.storage import make_store

        options = config.plugin_options(self.name)
        inner = make_store(options.get("store", "flat"), config.data_dir, reactor=reactor,
                           fsync=config.fsync)
        return ForwardingStore(inner, forwarder_from_options(options, reactor))


@implementer(IPlugin, IHookPlugin)
class _ForwardHookPlugin:
    name = "syslog-forward"

    def build(self, config, reactor):
        from stop.forward import ForwardHook, forwarder_from_options

        return ForwardHook(forwarder_from_options(config.plugin_options(self.name), reactor))


syslogForwardStore = _ForwardingStorePlugin()
syslogForwardHook = _ForwardHookPlugin()
