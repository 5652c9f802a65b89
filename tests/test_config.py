"""stop.config: the file, the defaults and the command line."""

import dataclasses
import os

import pytest

from stop import config
from stop.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_config_equals_code_defaults():
    """etc/stop.conf sets every setting, each to the code's default."""
    with open(os.path.join(ROOT, "etc", "stop.conf"), encoding="utf-8") as fh:
        parsed = config.parse(fh.read())
    defaults = {f.name: getattr(config.Config(), f.name) for f in dataclasses.fields(config.Config)}
    assert parsed == defaults


def test_dev_config_is_loopback_unprivileged_and_in_the_checkout():
    c = config.load(os.path.join(ROOT, "etc", "dev.conf"))
    assert c.listen == ("tcp:11113:interface=127.0.0.1", "tcp6:11113:interface=\\:\\:1")
    assert not os.path.isabs(c.data_dir)
    assert c.replace(listen=config.Config().listen, data_dir=config.Config().data_dir) == config.Config()


def test_overrides_beat_the_file(tmp_path):
    path = tmp_path / "s.conf"
    path.write_text("[stop]\nerrors = unknown\nstorage = gzip\ndata_dir = /srv/x\n")
    c = config.load(str(path), {"errors": "token", "storage": None, "listen": ("tcp:1:interface=127.0.0.1",)})
    assert (c.errors, c.storage, c.data_dir, c.listen) == ("token", "gzip", "/srv/x", ("tcp:1:interface=127.0.0.1",))


@pytest.mark.parametrize("text,word", [
    ("[stop]\nerors = token\n", "erors"),
    ("[stop]\nerrors = sometimes\n", "errors"),
    ("[stop]\nmax_lookups = many\n", "max_lookups"),
    ("[stop]\nmax_lookups = 0\n", "max_lookups"),
    ("[stop]\nuser_optin = perhaps\n", "user_optin"),
    ("[stop]\naddress_form = 192.0.2.0/33\n", "address_form"),
    ("[stop]\nhash = md5\n", "hash"),
    ("[other]\nx = 1\n", "other"),
    ("no section\n", "<string>"),
])
def test_bad_settings_are_named(text, word):
    with pytest.raises(ConfigError) as info:
        config.parse(text) if "section" in text else config.Config(**config.parse(text))
    assert word in str(info.value)


def test_types(tmp_path):
    c = config.Config(**config.parse(
        "[stop]\nuser_optin = off\nidle_timeout = 2.5\naddress_form = 192.0.2.0/24\n"
        "  2001:db8::/32\nlisten = tcp:1 tcp:2\n"))
    assert c.user_optin is False and c.idle_timeout == 2.5
    assert c.address_form == ("192.0.2.0/24", "2001:db8::/32")
    assert c.listen == ("tcp:1", "tcp:2")
    assert config.address_networks(("any",)) is None
    assert config.address_networks(("none",)) == ()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope"):
        config.load(str(tmp_path / "nope"))


def test_a_bad_value_names_where_it_came_from(tmp_path):
    conf = tmp_path / "stop.conf"
    conf.write_text("[stop]\nerrors = loud\n")
    with pytest.raises(ConfigError, match=f"^{conf}: errors: 'loud' is not one of"):
        config.load(str(conf))
    with pytest.raises(ConfigError, match="^command line: max_pipeline: must be at least 1"):
        config.load(str(conf), {"errors": "token", "max_pipeline": 0})
    assert config.load(str(conf), {"errors": "token"}).errors == "token"
    with pytest.raises(ConfigError, match="^command line: errors: 'loud'"):
        config.load(None, {"errors": "loud"})
