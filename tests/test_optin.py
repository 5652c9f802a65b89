"""stop.optin: ~/.ident is read only when safe, and matched correctly."""

import os

import pytest
from twisted.internet import defer

from stop.optin import OptIn, read_entries

UID = os.getuid()


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def optin_for(home, resolved=()):
    asked = []

    def resolve(names):
        asked.append(names)
        return defer.succeed(list(resolved))
    return Bound(OptIn(resolve=resolve), str(home)), asked


class Bound:
    """An OptIn asked about one home directory."""

    def __init__(self, optin, home):
        self.optin, self.home = optin, home

    def allows(self, uid, host):
        return self.optin.allows(uid, self.home, host)


def write(home, text, mode=0o644):
    path = home / ".ident"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_addresses_and_cidrs(tmp_path):
    write(tmp_path, "# irc servers\n192.0.2.7  198.51.100.0/24 # trailing\n2001:db8::/32\n")
    o, asked = optin_for(tmp_path)
    assert result(o.allows(UID, "192.0.2.7")) is True
    assert result(o.allows(UID, "198.51.100.200")) is True
    assert result(o.allows(UID, "2001:db8::5")) is True
    assert asked == []  # no names in the file: nothing resolved
    write(tmp_path, "192.0.2.7\nirc.example.org\n")
    assert result(o.allows(UID, "192.0.2.8")) is False
    assert asked == [["irc.example.org"]]


def test_names_are_resolved_forward(tmp_path):
    write(tmp_path, "irc.example.org\n")
    o, _ = optin_for(tmp_path, resolved=["192.0.2.9", "::ffff:192.0.2.10"])
    assert result(o.allows(UID, "192.0.2.9")) is True
    assert result(o.allows(UID, "192.0.2.10")) is True
    assert result(o.allows(UID, "192.0.2.11")) is False


def test_missing_file(tmp_path):
    o, _ = optin_for(tmp_path)
    assert result(o.allows(UID, "192.0.2.7")) is False


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_writable_by_others_is_ignored(tmp_path, mode):
    write(tmp_path, "192.0.2.7\n", mode)
    assert read_entries(str(tmp_path), UID) == []


def test_symlink_is_ignored(tmp_path):
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    target = write(elsewhere, "192.0.2.7\n")
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(target, home / ".ident")
    assert read_entries(str(home), UID) == []


def test_not_owned_by_the_user_is_ignored(tmp_path):
    write(tmp_path, "192.0.2.7\n")
    assert read_entries(str(tmp_path), UID + 1) == []


def test_directory_and_huge_file_are_ignored(tmp_path):
    (tmp_path / ".ident").mkdir()
    assert read_entries(str(tmp_path), UID) == []
    os.rmdir(tmp_path / ".ident")
    write(tmp_path, "192.0.2.7\n" * 10000)
    assert read_entries(str(tmp_path), UID) == []


def test_home_that_does_not_exist(tmp_path):
    o = OptIn()
    assert result(o.allows(UID, str(tmp_path / "gone"), "192.0.2.7")) is False


def test_log_lines_name_only_the_uid_when_asked(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        write(tmp_path, "192.0.2.7\n", 0o666)
        read_entries(str(tmp_path), UID, log_paths=False)
        read_entries(str(tmp_path), UID, log_paths=True)
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events if "ignoring" in formatEvent(e)]
    assert len(texts) == 2
    assert str(tmp_path) not in texts[0] and f"~uid{UID}/.ident" in texts[0]
    assert str(tmp_path) in texts[1]
