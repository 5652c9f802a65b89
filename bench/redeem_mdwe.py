"""Does the redemption service's TLS need write+execute memory?

``MemoryDenyWriteExecute=yes`` (etc/stopd.service) forbids W+X mappings; a
cffi callback (pyOpenSSL's Python verify, ALPN, SNI, info callbacks) needs
one. This runs a TLS server in a child process under the kernel's
``PR_SET_MDWE`` (Linux 6.3+: the same refusal, kept across execve) and makes
one mutual-TLS request to it, three ways:

- ``stop``: the service's own context (:mod:`stop.redeem.tls`: ``set_verify``
  without a callback) behind a factory without ALPN, as the daemon runs it;
- ``stop+alpn``: the same context behind a plain ``twisted.web`` ``Site``
  (which offers ALPN, so Twisted installs a selection callback);
- ``CertificateOptions``: Twisted's ``ssl.CertificateOptions`` with the CA
  as trust root.

    .venv/bin/python bench/redeem_mdwe.py          # newest PyPI stack
    .venv-debian/bin/python bench/redeem_mdwe.py   # Debian 12's python3-openssl 23.0 & co
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SERVER = r'''
import ctypes, os, sys
sys.path.insert(0, ROOT)
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
from twisted.internet import reactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server
from stop.redeem.service import _PlainFactory
from stop.redeem.tls import ServerTLS

class Hello(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        return b"hello"

site = server.Site(Hello())
if MODE == "CertificateOptions":
    from twisted.internet import ssl as tssl
    from OpenSSL import crypto
    creator = tssl.CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, open(KEY, "rb").read()),
        certificate=crypto.load_certificate(crypto.FILETYPE_PEM, open(CERT, "rb").read()),
        trustRoot=tssl.trustRootFromCertificates([tssl.Certificate.loadPEM(open(CA).read())]))
    wrapped = _PlainFactory(site)
else:
    creator = ServerTLS(CERT, KEY, CA)
    wrapped = site if MODE == "stop+alpn" else _PlainFactory(site)
try:
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(creator, False, wrapped), interface="127.0.0.1")
except Exception as e:
    print("FAILED", type(e).__name__ + ":", str(e).split(" You might")[0][:80], flush=True)
    sys.exit(0)
print(port.getHost().port, flush=True)
reactor.run()
'''


def trial(mode: str, files: dict) -> str:
    code = "".join(f"{k} = {v!r}\n" for k, v in dict(files, MODE=mode, ROOT=ROOT).items()) + SERVER
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()
        if not first.isdigit():
            err = proc.stderr.read() if proc.poll() is not None else ""
            return first or "FAILED " + err.strip().splitlines()[-1][:100] if err else first
        ctx = ssl.create_default_context(cafile=files["CA"])
        ctx.load_cert_chain(files["CLIENT"], files["CLIENT_KEY"])
        import http.client
        conn = http.client.HTTPSConnection("127.0.0.1", int(first), context=ctx, timeout=10)
        try:
            conn.request("GET", "/")
            body = conn.getresponse().read()
            ok = body == b"hello"
        except Exception as e:
            ok = False
            body = repr(e)
        time.sleep(0.2)
        if proc.poll() is not None or not ok:
            proc.kill()
            err = proc.stderr.read()
            lines = err.splitlines()
            why = [l for l in lines if "write+execute" in l] or [l for l in lines if "Error" in l]
            text = why[0].strip() if why else str(body)
            return "FAILED " + text.split(" You might")[0][:110]
        return "OK (mutual TLS request answered)"
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


def main() -> int:
    from tests.testca import TestCA
    import OpenSSL
    import twisted
    probe = subprocess.run([sys.executable, "-c",
                            "import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"])
    if probe.returncode != 0:
        print("this kernel has no PR_SET_MDWE (Linux 6.3+): nothing to measure")
        return 1
    with tempfile.TemporaryDirectory() as d:
        ca = TestCA(d)
        cert, key = ca.host("127.0.0.1")
        client, client_key = ca.client("bench")
        files = {"CERT": cert, "KEY": key, "CA": ca.path, "CLIENT": client, "CLIENT_KEY": client_key}
        print(f"Twisted {twisted.__version__}, pyOpenSSL {OpenSSL.__version__}, under PR_SET_MDWE:")
        for mode in ("stop", "stop+alpn", "CertificateOptions"):
            print(f"  {mode:20} {trial(mode, files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
