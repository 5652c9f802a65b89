"""Build ``bench/loadgen.c`` at run time and run it.

The C load generator costs a fraction of the CPU of ``bench/loadgen.py``
per query, so on a 2-core machine it leaves the server the other core. It
is compiled with ``gcc -O2`` into a private temporary directory (removed by
:meth:`CLoadgen.close`), never committed as a binary. ``pin`` runs it under
``taskset -c CPUS``.

    gen = CLoadgen(pin="1")
    result = gen.run("127.0.0.1:1113", "127.0.0.2", "pairs.txt", 4000, 10, 60)
    gen.close()

``result`` has the keys of ``bench/loadgen.py`` plus ``cpu_s``: the
generator's own CPU seconds (user + system) for that run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "loadgen.c")


class CLoadgen:
    """The compiled generator; ``pin``: CPU list for ``taskset -c`` (or None)."""

    def __init__(self, pin: Optional[str] = None):
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("no C compiler (apt-get install gcc)")
        if pin is not None and shutil.which("taskset") is None:
            raise RuntimeError("--pin needs taskset (util-linux)")
        self._dir = tempfile.mkdtemp(prefix="stop-loadgen-")
        os.chmod(self._dir, 0o700)
        self.path = os.path.join(self._dir, "loadgen")
        out = subprocess.run([cc, "-O2", "-Wall", "-o", self.path, SOURCE],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            self.close()
            raise RuntimeError(f"building {SOURCE} failed:\n{out.stderr}")
        self.pin = pin

    def describe(self) -> str:
        where = f", pinned to CPU {self.pin} (taskset)" if self.pin is not None else ""
        return f"bench/loadgen.c (gcc -O2, built at run time){where}"

    def command(self, dest: str, source: str, pairs_file: str, count: int, concurrency: int,
                time_limit: float, suffix: str = "") -> list[str]:
        cmd = [self.path, "--dest", dest, "--source", source, "--pairs", pairs_file,
               "--count", str(count), "--concurrency", str(concurrency),
               "--time-limit", str(time_limit)]
        if suffix:
            cmd += ["--suffix", suffix]
        if self.pin is not None:
            cmd = ["taskset", "-c", self.pin] + cmd
        return cmd

    def run(self, dest: str, source: str, pairs_file: str, count: int, concurrency: int,
            time_limit: float, suffix: str = "") -> dict:
        """One bounded run; its JSON result."""
        out = subprocess.run(self.command(dest, source, pairs_file, count, concurrency,
                                          time_limit, suffix),
                             capture_output=True, text=True, timeout=time_limit + 60)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr}")
        return json.loads(out.stdout)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
