"""Certificates for TLS tests: a throwaway CA, server and client certificates
(:func:`make_test_pki`), and the server side of a TLS setup (:class:`ServerTLS`)."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path
from typing import Any

import attrs

from electfsm.errors import ConfigError
from electfsm.etcd.security import TLS
from electfsm.testing.etcd_binaries import _HOST

# --------------------------------------------------------------------------- TLS


def _check_file(what: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"the {what} file {path!r} does not exist")


@attrs.frozen
class ServerTLS:
    """TLS on a :class:`~electfsm.testing.LocalEtcd`'s client URL; peer traffic stays plain
    http on loopback.

    ::

        tls = ServerTLS("server.pem", "server-key.pem", ca_file="ca.pem",
                        client_cert_auth=True, health_cert=("client.pem", "client-key.pem"))

    ``cert_file``/``key_file``: the server certificate (it must name ``127.0.0.1``) and its key.
    ``ca_file``: the CA that signed the server certificate, trusted by the health check (without
    it the health check does not verify the server: it is our own child on loopback), and with
    ``client_cert_auth`` also the CA of client certificates. ``client_cert_auth``:
    ``--client-cert-auth --trusted-ca-file=<ca_file>``, clients must present a certificate
    signed by ``ca_file``. (etcd requires client certificates whenever ``--trusted-ca-file`` is
    set, so that flag is passed only with ``client_cert_auth``.) ``health_cert``:
    ``(cert, key)`` that the health check presents; required with ``client_cert_auth``.
    """

    cert_file: str
    key_file: str
    ca_file: str | None = None
    client_cert_auth: bool = False
    health_cert: tuple[str, str] | None = None

    def __attrs_post_init__(self) -> None:
        _check_file("server certificate", self.cert_file)
        _check_file("server key", self.key_file)
        if self.ca_file is not None:
            _check_file("CA certificate", self.ca_file)
        if self.health_cert is not None:
            _check_file("health-check client certificate", self.health_cert[0])
            _check_file("health-check client key", self.health_cert[1])
        if self.client_cert_auth and self.ca_file is None:
            raise ConfigError("client_cert_auth needs ca_file: the CA that signs client "
                              "certificates (etcd's --trusted-ca-file)")
        if self.client_cert_auth and self.health_cert is None:
            raise ConfigError("client_cert_auth needs health_cert=(cert, key): the health "
                              "check must present a client certificate signed by ca_file")

    def flags(self) -> list[str]:
        """etcd's command-line flags for this TLS setup."""
        out = [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}"]
        if self.client_cert_auth:
            # Only here: etcd requires a client certificate whenever --trusted-ca-file is set.
            out += [f"--trusted-ca-file={self.ca_file}", "--client-cert-auth"]
        return out

    def ssl_context(self) -> ssl.SSLContext:
        """The health check's client context: trusts ``ca_file``, presents ``health_cert``."""
        if self.ca_file is not None:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.health_cert is not None:
            ctx.load_cert_chain(self.health_cert[0], self.health_cert[1])
        return ctx

    def client_tls(self) -> TLS:
        """:class:`~electfsm.etcd.security.TLS` for our clients: ``ca_file``, and ``health_cert``
        as the client certificate (``None`` parts stay unset)."""
        cert, key = self.health_cert if self.health_cert is not None else (None, None)
        return TLS(ca=self.ca_file, cert=cert, key=key)


@attrs.frozen(kw_only=True)
class TestPKI:
    """Certificate files written by :func:`make_test_pki` (PEM, keys are ECDSA, mode 0600).

    ``ca_cert`` signs ``server_*`` (for ``127.0.0.1`` and ``localhost``), ``client_*``
    (common name ``client_common_name``) and ``expired_server_*`` (valid only in the past).
    ``other_ca_cert`` is an unrelated CA; it signs ``other_client_*``.
    """

    __test__ = False  # not a pytest test class, whatever its name

    directory: str
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    client_common_name: str
    other_ca_cert: str
    other_client_cert: str
    other_client_key: str
    expired_server_cert: str
    expired_server_key: str

    def server_tls(self, *, client_cert_auth: bool = False, expired: bool = False) -> ServerTLS:
        """:class:`ServerTLS` with these files; the health check presents the client cert."""
        cert, key = ((self.expired_server_cert, self.expired_server_key) if expired
                     else (self.server_cert, self.server_key))
        return ServerTLS(cert, key, ca_file=self.ca_cert, client_cert_auth=client_cert_auth,
                         health_cert=(self.client_cert, self.client_key))

    def client_tls(self, *, cert: bool = True, server_name: str | None = None) -> TLS:
        """:class:`~electfsm.etcd.security.TLS` trusting ``ca_cert``, with the client cert if
        ``cert``."""
        if cert:
            return TLS(ca=self.ca_cert, cert=self.client_cert, key=self.client_key,
                       server_name=server_name)
        return TLS(ca=self.ca_cert, server_name=server_name)


def make_test_pki(directory: str | os.PathLike[str]) -> TestPKI:
    """Write a throw-away PKI for TLS tests into ``directory`` (created if missing).

    Needs the ``trustme`` package (a test dependency, not a runtime one).
    """
    try:
        import trustme
    except ImportError:
        raise RuntimeError("make_test_pki needs the 'trustme' package: pip install trustme "
                           "(it is one of electfsm's dev dependencies)") from None
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)

    def cert_and_key(leaf: Any, stem: str) -> tuple[str, str]:
        cert, key = root / f"{stem}.pem", root / f"{stem}-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        return str(cert), str(key)

    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(root / "ca.pem")
    other_ca.cert_pem.write_to_path(root / "other-ca.pem")
    common_name = "electfsm-client"
    now = datetime.datetime.now(datetime.timezone.utc)
    server = cert_and_key(ca.issue_cert(_HOST, "localhost"), "server")
    client = cert_and_key(ca.issue_cert(common_name, common_name=common_name), "client")
    other = cert_and_key(other_ca.issue_cert(common_name, common_name=common_name),
                         "other-client")
    expired = cert_and_key(
        ca.issue_cert(_HOST, "localhost", not_before=now - datetime.timedelta(days=2),
                      not_after=now - datetime.timedelta(days=1)),
        "expired-server")
    return TestPKI(
        directory=str(root), ca_cert=str(root / "ca.pem"),
        server_cert=server[0], server_key=server[1],
        client_cert=client[0], client_key=client[1], client_common_name=common_name,
        other_ca_cert=str(root / "other-ca.pem"),
        other_client_cert=other[0], other_client_key=other[1],
        expired_server_cert=expired[0], expired_server_key=expired[1],
    )
