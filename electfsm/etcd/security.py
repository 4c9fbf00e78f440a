"""Secure connections: TLS (server verification, client certificates) and etcd users.

::

    Elector(endpoints=["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
            election="jobs/scheduler", identity="node-a",
            tls=TLS(ca="ca.pem", cert="client.pem", key="client-key.pem"),
            auth=Auth(user="scheduler", password=os.environ["ETCD_PASSWORD"]))

Files are read once, at construction, so a wrong path fails there and not at 3 a.m.
Neither ``repr`` nor any error message ever shows a password or key material.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from electfsm.errors import ConfigError


def _read(what: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path!r}: {exc.strerror or exc}; "
                          "check the path and its permissions") from None
    if not data.strip():
        raise ConfigError(f"the {what} file {path!r} is empty")
    return data


@attrs.frozen(kw_only=True)
class TLS:
    """TLS to etcd: ``ca`` verifies the server (None: the system's roots); ``cert`` and
    ``key`` are the client certificate for servers run with ``--client-cert-auth``;
    ``server_name`` overrides the name checked against the server's certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    _ca_pem: bytes | None = attrs.field(init=False, repr=False, eq=False)
    _cert_pem: bytes | None = attrs.field(init=False, repr=False, eq=False)
    _key_pem: bytes | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs both cert and key (got only "
                              f"{'cert' if self.cert else 'key'}); pass both or neither")
        object.__setattr__(self, "_ca_pem", _read("CA certificate", self.ca))
        object.__setattr__(self, "_cert_pem", _read("client certificate", self.cert))
        object.__setattr__(self, "_key_pem", _read("client key", self.key))

    def credentials(self) -> Any:
        """gRPC channel credentials for these files."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self._ca_pem,
                                            private_key=self._key_pem,
                                            certificate_chain=self._cert_pem)


@attrs.frozen(kw_only=True)
class Auth:
    """An etcd user. The password never appears in ``repr``, logs or errors."""

    user: str = attrs.field()
    password: str = attrs.field(repr=lambda _: "'***'")

    @user.validator
    def _check_user(self, _attr: Any, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise ConfigError("auth user must be a non-empty str")

    @password.validator
    def _check_password(self, _attr: Any, value: Any) -> None:
        if not isinstance(value, str):
            raise ConfigError("auth password must be a str")
