"""Elector configuration: validated once, where user input enters."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from electfsm.errors import ConfigError
from electfsm.etcd.security import TLS, Auth

if TYPE_CHECKING:
    from electfsm.etcd.client import EtcdClient

#: etcd refuses requests over 1.5 MiB by default; the identity is the value of our key.
MAX_IDENTITY_BYTES = 1024 * 1024
MAX_ELECTION_BYTES = 4096
#: etcd's largest lease TTL (``MaxLeaseTTL`` in server/lease/lessor.go).
MAX_TTL = 9_000_000_000

_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>[0-9]{1,5})$")


def default_margin(ttl: int) -> float:
    """How long before the server could expire our lease we step down, for a ``ttl``.

    A tenth of the TTL, at least 0.25 s and at most 1 s: enough for clock-rate drift
    between this host and etcd's leader and for the dispatcher to run the exit hooks.
    """
    return min(1.0, max(0.25, ttl * 0.1))


def safe_until(sent_at: float, ttl: int, margin: float) -> float:
    """The local deadline of a lease whose last confirmed keepalive was *sent* at ``sent_at``.

    etcd sets the expiry to (when it processed the keepalive) + TTL, never earlier than the
    send time + TTL; stepping down ``margin`` before that is safe without trusting any clock
    but our own (:func:`electfsm.clock.now`, which keeps counting while the host is
    suspended, as etcd's lease does).
    """
    return sent_at + ttl - margin


def parse_endpoint(raw: str) -> tuple[str, bool | None]:
    """``"host:port"`` (or ``http://``/``https://host:port``) → (``host:port``, secure or None)."""
    if not isinstance(raw, str):
        raise ConfigError(f"endpoint {raw!r} must be a string like '127.0.0.1:2379'")
    text = raw.strip()
    secure: bool | None = None
    for scheme, is_secure in (("http://", False), ("https://", True), ("unix://", None)):
        if text.lower().startswith(scheme):
            if scheme == "unix://":
                raise ConfigError(f"endpoint {raw!r}: unix sockets are not supported; "
                                  "use host:port")
            text, secure = text[len(scheme):].rstrip("/"), is_secure
    m = _HOSTPORT.match(text)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"endpoint {raw!r} is not host:port (for example '127.0.0.1:2379' or "
                          "'https://etcd-1:2379'); fix the endpoints list")
    return text, secure


def _endpoints(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()] or [value]
    if not isinstance(value, Sequence) or not value:
        raise ConfigError("endpoints is empty: give at least one etcd endpoint, "
                          "e.g. endpoints=['127.0.0.1:2379']")
    return tuple(value)


def _check_endpoints(_inst: Any, _attr: Any, value: tuple[str, ...]) -> None:
    schemes = {parse_endpoint(e)[1] for e in value} - {None}
    if len(schemes) > 1:
        raise ConfigError(f"endpoints {list(value)} mix http:// and https://; use one scheme")


def check_election(name: Any) -> str:
    """Validate an election name and return it; raise :class:`ConfigError` saying why not."""
    if not isinstance(name, str):
        raise ConfigError(f"election must be a str like 'jobs/scheduler', got "
                          f"{type(name).__name__}")
    if not name.strip():
        raise ConfigError("election name is empty; give a name like 'jobs/scheduler'")
    if name != name.strip():
        raise ConfigError(f"election name {name!r} has leading or trailing whitespace; "
                          "remove it")
    if name.endswith("/"):
        raise ConfigError(f"election name {name!r} ends with '/'; candidate keys are "
                          f"'<name>/<lease>', so drop the trailing slash ({name.rstrip('/')!r})")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ConfigError(f"election name {name!r} contains control characters (newline, NUL, "
                          "…); use printable characters only")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ConfigError(f"election name {name!r} is not valid Unicode text: {exc}") from None
    if size > MAX_ELECTION_BYTES:
        raise ConfigError(f"election name is {size} bytes; the limit is {MAX_ELECTION_BYTES}")
    return name


def identity_bytes(identity: Any) -> bytes:
    """The identity as the bytes stored in our key; raise :class:`ConfigError` if unusable."""
    if isinstance(identity, str):
        try:
            value = identity.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"identity {identity[:40]!r} is not valid Unicode text: {exc}; "
                              "pass bytes instead") from None
    elif isinstance(identity, bytes | bytearray):
        value = bytes(identity)
    else:
        raise ConfigError(f"identity must be str or bytes (it is stored as the value of our "
                          f"key), got {type(identity).__name__}")
    if not value:
        raise ConfigError("identity is empty; give each node a name others can recognise, "
                          "e.g. its hostname")
    if len(value) > MAX_IDENTITY_BYTES:
        raise ConfigError(f"identity is {len(value)} bytes; the limit is {MAX_IDENTITY_BYTES} "
                          "(1 MiB): store large data elsewhere and put its name here")
    return value


def _check_ttl(_inst: Any, _attr: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ttl must be a whole number of seconds (int), got {value!r}")
    if not 0 < value <= MAX_TTL:
        raise ConfigError(f"ttl must be between 1 and {MAX_TTL} seconds, got {value}; "
                          "etcd raises a TTL below its minimum (usually 2 s) by itself")


def _positive(what: str) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
    return check


@attrs.frozen(kw_only=True)
class ElectorConfig:
    """Everything an :class:`~electfsm.Elector` is built from, checked at construction."""

    endpoints: tuple[str, ...] = attrs.field(converter=_endpoints, validator=_check_endpoints)
    election: str = attrs.field(converter=check_election)
    identity: bytes = attrs.field(converter=identity_bytes, repr=False)
    ttl: int = attrs.field(default=10, validator=_check_ttl)
    margin: float | None = None
    call_timeout: float = attrs.field(default=2.0, validator=_positive("call_timeout"))
    backoff_max: float = attrs.field(default=2.0, validator=_positive("backoff_max"))
    tls: TLS | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.instance_of(TLS)))
    auth: Auth | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.instance_of(Auth)))

    def __attrs_post_init__(self) -> None:
        for endpoint in self.endpoints:
            parse_endpoint(endpoint)
        if self.secure and self.tls is None:
            object.__setattr__(self, "tls", TLS())
        if self.tls is not None and any(parse_endpoint(e)[1] is False for e in self.endpoints):
            raise ConfigError("tls is set but the endpoints say http://; use https:// or "
                              "plain host:port")
        if self.margin is not None:
            _positive("margin")(self, None, self.margin)
            if self.margin >= self.ttl / 2:
                raise ConfigError(f"margin {self.margin}s must be under half the ttl "
                                  f"({self.ttl}s); use a longer ttl or a smaller margin")

    @property
    def prefix(self) -> str:
        return self.election + "/"

    def margin_for(self, granted_ttl: int) -> float:
        """The step-down margin for the TTL etcd actually granted."""
        if self.margin is not None:
            return min(self.margin, granted_ttl / 2)
        return default_margin(granted_ttl)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(parse_endpoint(e)[0] for e in self.endpoints)

    @property
    def secure(self) -> bool:
        """https:// endpoints or TLS settings: connect with TLS."""
        return self.tls is not None or any(parse_endpoint(e)[1] for e in self.endpoints)


def connection(endpoints: str | Sequence[str] | None, client: EtcdClient | None,
               tls: TLS | None, auth: Auth | None,
               call_timeout: float) -> tuple[str | Sequence[str], float]:
    """The endpoints and call timeout to use: a shared ``client``'s, or the ones given.
    Refuses both at once, and neither."""
    if client is not None:
        if endpoints is not None or tls is not None or auth is not None:
            raise ConfigError("pass either client= (a shared connection) or "
                              "endpoints/tls/auth, not both")
        return list(client.hosts), client.timeout
    if endpoints is None:
        raise ConfigError("endpoints is empty: give at least one etcd endpoint, "
                          "e.g. endpoints=['127.0.0.1:2379']")
    return endpoints, call_timeout
