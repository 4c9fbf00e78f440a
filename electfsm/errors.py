"""Errors raised by electfsm. Each message says what was wrong and what to do."""

from __future__ import annotations


class ElectfsmError(Exception):
    """Base class of every error electfsm raises on purpose."""


class ConfigError(ElectfsmError, ValueError):
    """A constructor argument is invalid; raised before anything touches etcd."""


class NotLeaderError(ElectfsmError):
    """The call needs leadership that this elector does not hold (or no longer holds)."""


class EtcdError(ElectfsmError):
    """etcd answered with an error, or did not answer in time."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached, or did not answer within the call timeout."""


class LeaseNotFound(EtcdError):
    """etcd no longer knows the lease (it expired or was revoked)."""


class WatchCompacted(EtcdError):
    """A watch asked for history that etcd has already compacted."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class PermissionDenied(EtcdError):
    """etcd refused the request: the user lacks permission, or authentication failed."""


class ElectorStopped(ElectfsmError):
    """The elector was stopped; a stopped elector cannot be started again."""


class ElectorThreadError(ElectfsmError, RuntimeError):
    """A blocking call was made on the elector's dispatcher thread (from a hook), where it
    could only wait on itself. Call it from another thread, or use a non-blocking form."""


class HookError(ElectfsmError):
    """A user hook raised. Passed to ``on_error`` hooks.

    After an :class:`Exception` the machine keeps running; after anything else (``SystemExit``,
    ``KeyboardInterrupt``) it stops, releasing its leadership and lease, as ``stop()`` would.
    """

    def __init__(self, hook_name: str, cause: BaseException) -> None:
        super().__init__(f"hook {hook_name} raised {type(cause).__name__}: {cause}")
        self.hook_name = hook_name
        self.cause = cause
