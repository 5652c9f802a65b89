"""A throwaway certificate authority for tests of the redemption service:
host certificates (subjectAltName = their addresses), client certificates
(valid, expired, with DNS names), a CRL. ECDSA P-256 keys: fast to make.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: str, data: bytes, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


class TestCA:
    """A CA whose files live in ``directory`` (``<name>-ca.pem``, and
    ``<name>-<stem>.pem/.key`` for what it issues: several CAs may share
    a directory)."""

    __test__ = False  # not a pytest class

    def __init__(self, directory, name: str = "test fleet CA"):
        self.dir = str(directory)
        self.name = name
        self.slug = slug = name.replace(" ", "-")
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(_now() - DAY).not_valid_after(_now() + 30 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = _write(os.path.join(self.dir, f"{slug}-ca.pem"),
                           self.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self.issued: dict[str, x509.Certificate] = {}

    def _issue(self, stem: str, cn: str, san: list, usage, before=None, after=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(before or _now() - DAY).not_valid_after(after or _now() + 10 * DAY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        self.issued[stem] = cert
        cert_path = _write(os.path.join(self.dir, f"{self.slug}-{stem}.pem"),
                           cert.public_bytes(serialization.Encoding.PEM), 0o644)
        key_path = _write(os.path.join(self.dir, f"{self.slug}-{stem}.key"), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_path, key_path

    def host(self, address: str, names: tuple = ()) -> tuple[str, str]:
        """A server certificate for ``address`` (and DNS ``names``):
        ``(cert_path, key_path)``."""
        san = [x509.IPAddress(ipaddress.ip_address(address))] + [x509.DNSName(n) for n in names]
        return self._issue(f"host-{address.replace(':', '_')}", address, san,
                           ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, cn: str, dns: tuple = (), expired: bool = False) -> tuple[str, str]:
        """A client certificate with common name ``cn``: ``(cert, key)``;
        ``expired``: its validity ended yesterday."""
        before = after = None
        if expired:
            before, after = _now() - 10 * DAY, _now() - DAY
        stem = f"client-{cn}" + ("-expired" if expired else "")
        return self._issue(stem, cn, [x509.DNSName(n) for n in dns],
                           ExtendedKeyUsageOID.CLIENT_AUTH, before, after)

    def fingerprint(self, stem: str) -> str:
        return "sha256:" + self.issued[stem].fingerprint(hashes.SHA256()).hex()

    def crl(self, revoked_stems=(), path: str = None) -> str:
        """A CRL revoking the certificates issued under ``revoked_stems``."""
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now() - DAY).next_update(_now() + 7 * DAY))
        for stem in revoked_stems:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(self.issued[stem].serial_number)
                .revocation_date(_now() - DAY).build())
        crl = builder.sign(self.key, hashes.SHA256())
        return _write(path or os.path.join(self.dir, "crl.pem"),
                      crl.public_bytes(serialization.Encoding.PEM), 0o644)
