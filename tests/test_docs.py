"""The man pages say what the code does: every setting of etc/stop.conf with
its default in stop.conf(5), every option in stop(8) and stopctl(8), the
plugin example of stop-plugins(7) works, and every page renders cleanly."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess

import pytest
from twisted.internet.task import Clock

from stop import config, ctl, plugins, tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "man")
PAGES = ["stop.8", "stopctl.8", "stop.conf.5", "stop-plugins.7"]


def page(name: str) -> str:
    with open(os.path.join(MAN, name), encoding="utf-8") as fh:
        return fh.read()


def unroff(text: str) -> str:
    """Roff escapes used in our pages, back to plain text."""
    return text.replace("\\e", "\\").replace("\\-", "-").replace("\\(dq", '"')


def shipped_settings() -> dict:
    with open(os.path.join(ROOT, "etc", "stop.conf"), encoding="utf-8") as fh:
        text = fh.read()
    values = config.parse(text)
    values.pop("plugin_settings")  # the [plugin NAME] sections, not a setting
    raw = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s*=\s*(.*)$", line)
        if m:
            raw[m.group(1)] = m.group(2).strip()
    assert set(raw) == set(values)
    return raw


def setting_paragraphs() -> dict[str, str]:
    """stop.conf(5)'s ``.TP`` / ``.B name`` paragraphs, by name."""
    out = {}
    for chunk in page("stop.conf.5").split(".TP\n")[1:]:
        first, _, body = chunk.partition("\n")
        m = re.fullmatch(r"\.B (\w+)", first)
        if m:
            out[m.group(1)] = unroff(re.split(r"\n\.S[HS] ", body)[0])
    return out


def test_every_setting_documented_with_its_default():
    paragraphs = setting_paragraphs()
    for name, default in shipped_settings().items():
        assert name in paragraphs, f"stop.conf(5) does not document {name}"
        text = paragraphs[name]
        if default:
            assert re.search(r"Default:\n\.BR? " + re.escape(default) + r"( \.)?(\n|$)", text), \
                f"stop.conf(5): {name} does not say its default is {default!r}"
        else:
            assert "Default: none" in text, f"stop.conf(5): {name} has no 'Default: none'"


def test_no_setting_documented_that_does_not_exist():
    known = set(shipped_settings())
    assert set(setting_paragraphs()) <= known


def test_daemon_options_in_stop_8():
    text = unroff(page("stop.8"))
    options = tap.Options()
    names = [p[0] for p in options.optParameters] + ["listen"]
    for name in names:
        assert f".BI --{name} " in text, f"stop(8) does not document --{name}"
    for short in [p[1] for p in options.optParameters if p[1]]:
        assert f"-{short} " in text


def test_stopctl_options_in_stopctl_8():
    text = unroff(page("stopctl.8"))
    parser = ctl._parser()
    seen = set()
    for action in parser._actions:
        seen.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                assert f".B {command}" in text or f".BI {command} " in text
                for a in sub._actions:
                    seen.update(a.option_strings)
    seen -= {"-h", "--help"}
    for option in seen:
        assert re.search(r"\.BR?I? .*" + re.escape(option) + r"\b", text), \
            f"stopctl(8) does not document {option}"


def test_plugin_example_in_stop_plugins_7_works(tmp_path):
    text = unroff(page("stop-plugins.7"))
    [example] = [b for b in re.findall(r"\.nf\n(.*?)\n\.fi", text, re.S) if "class Count" in b]
    (tmp_path / "count.py").write_text(example + "\n")
    settings = config.Config(plugin_dirs=(str(tmp_path),), hooks=("count",))
    [hook] = plugins.build_hooks(settings, Clock())
    hook.recordSaved("t", b"{}")
    assert hook.n == 1


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
@pytest.mark.parametrize("name", PAGES)
def test_page_renders_without_warnings(name):
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", os.path.join(MAN, name)],
                            capture_output=True, env=env, timeout=60)
    assert result.returncode == 0
    assert result.stderr == b"", result.stderr.decode(errors="replace")
    assert len(result.stdout.splitlines()) > 20


def test_reloaded_settings_are_marked_in_stop_conf_5():
    marked = {name for name, text in setting_paragraphs().items()
              if "Reloaded on SIGHUP." in text}
    assert marked == config.RELOADABLE


def test_stop_8_signals_and_exit_statuses_follow_the_code():
    text = unroff(page("stop.8"))
    sections = dict(re.findall(r"^\.SH ([^\n]+)\n(.*?)(?=^\.SH |\Z)", text, re.M | re.S))
    for name in ("SIGHUP", "SIGTERM", "SIGUSR1"):
        assert name in sections["SIGNALS"]
    statuses = re.findall(r"^\.TP\n\.B (\d+)\n", sections["EXIT STATUS"], re.M)
    assert statuses == [str(tap.EXIT_FAILURE), str(tap.EXIT_CONFIG)]
    assert f"RestartPreventExitStatus={tap.EXIT_CONFIG}" in sections["EXIT STATUS"]


def test_the_unit_reloads_and_restarts_as_stop_8_says():
    with open(os.path.join(ROOT, "etc", "stopd.service"), encoding="utf-8") as fh:
        lines = [line for line in fh.read().splitlines() if not line.startswith("#")]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines
    assert "Restart=on-failure" in lines
    assert f"RestartPreventExitStatus={tap.EXIT_CONFIG}" in lines


def test_stopctl_8_lists_every_trace_exit_status():
    """Each status stopctl trace returns has its own entry in stopctl(8)."""
    from stop.redeem import cli
    text = unroff(page("stopctl.8"))
    sections = dict(re.findall(r"^\.SH ([^\n]+)\n(.*?)(?=^\.SH |\Z)", text, re.M | re.S))
    statuses = {int(s) for s in re.findall(r"^\.TP\n\.B (\d+)\n", sections["EXIT STATUS"], re.M)}
    codes = set(cli.EXIT.values()) | {cli.EXIT_OK, cli.EXIT_USAGE, cli.EXIT_INCOMPLETE}
    assert codes <= statuses
    assert 'answered "not found"' in sections["EXIT STATUS"].split(f".B {cli.EXIT_UNKNOWN}\n")[1]
    assert "trace" in sections["NAME"] and "audit" in sections["NAME"]


def test_stop_conf_redeem_allow_example_parses():
    """The commented redeem_allow example of etc/stop.conf is a policy the
    daemon accepts."""
    from stop.redeem.policy import parse_policy
    with open(os.path.join(ROOT, "etc", "stop.conf"), encoding="utf-8") as fh:
        text = fh.read()
    block = re.search(r"^#   redeem_allow = (.*?)\n((?:#                  .*\n)*)", text, re.M)
    lines = [block.group(1)] + [l[1:].strip() for l in block.group(2).splitlines()]
    assert len(lines) == 4
    policy = parse_policy("\n".join(lines))
    assert len(policy.rules) == 3 and len(policy.refused) == 1
