"""A private network namespace for tests that need port 113 (as root):
only its own loopback, made by the test and removed afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Netns:
    def __init__(self, tag: str):
        self.name = f"stoptest-{tag}-{os.getpid()}"

    def __enter__(self) -> "Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"], check=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name] + list(argv)

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", 60)
        return subprocess.run(self.command(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kw)
