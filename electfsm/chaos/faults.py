"""The fault kit: a link proxy per candidate and member (:class:`Link`), cgroup v1 freezer
and CPU limits, and an nftables packet filter."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from electfsm.testing.faultproxy import FaultProxy

# --------------------------------------------------------------------------- links


class Link:
    """A candidate's fault proxies (one per etcd endpoint), switched together."""

    def __init__(self, proxies: Sequence[FaultProxy]) -> None:
        self.proxies = list(proxies)

    @property
    def endpoints(self) -> list[str]:
        return [p.endpoint for p in self.proxies]

    def pass_through(self) -> None:
        for p in self.proxies:
            p.pass_through()
            with contextlib.suppress(RuntimeError):
                p.accept_again()

    def blackhole(self) -> None:
        for p in self.proxies:
            p.blackhole()

    def drop_responses(self) -> None:
        for p in self.proxies:
            p.drop_responses()

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        for p in self.proxies:
            p.latency(seconds, jitter)

    def reset(self) -> None:
        for p in self.proxies:
            p.reset()

    def refuse(self) -> None:
        for p in self.proxies:
            p.refuse()

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()


# --------------------------------------------------------------------------- cgroups


def _cgroup_v1(controller: str) -> Path | None:
    root = Path("/sys/fs/cgroup") / controller
    return root if (root / "cgroup.procs").exists() else None


def cgroup_problem(controller: str) -> str | None:
    """Why a cgroup-v1 ``controller`` cannot be used here, or None if it can (probed)."""
    root = _cgroup_v1(controller)
    if root is None:
        return f"no cgroup v1 {controller} hierarchy at /sys/fs/cgroup/{controller}"
    probe = root / f"electfsm-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a {controller} cgroup ({exc})"
    with contextlib.suppress(OSError):
        probe.rmdir()
    return None


class _CGroup:
    def __init__(self, controller: str, pid: int) -> None:
        root = _cgroup_v1(controller)
        if root is None:
            raise RuntimeError(f"no cgroup v1 {controller} hierarchy")
        self.root = root
        self.path = root / f"electfsm-{uuid.uuid4().hex[:10]}"
        self.path.mkdir()
        self.pid = pid
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            (self.root / "cgroup.procs").write_text(str(self.pid))
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)


class Freezer(_CGroup):
    """Freeze a process with the cgroup-v1 freezer (the whole process, all threads)."""

    def __init__(self, pid: int) -> None:
        super().__init__("freezer", pid)

    def _set(self, state: str) -> None:
        (self.path / "freezer.state").write_text(state)
        for _ in range(200):
            if (self.path / "freezer.state").read_text().strip() == state:
                return
            time.sleep(0.005)

    def freeze(self) -> None:
        self._set("FROZEN")

    def thaw(self) -> None:
        self._set("THAWED")

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.thaw()
        super().remove()


class CpuLimit(_CGroup):
    """Limit a process to ``percent`` of one CPU with the CFS quota (cgroup v1 ``cpu``)."""

    def __init__(self, pid: int, percent: float) -> None:
        super().__init__("cpu", pid)
        (self.path / "cpu.cfs_period_us").write_text("100000")
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(percent * 1000))))


# --------------------------------------------------------------------------- nftables


def nft_problem() -> str | None:
    """Why packet-level faults (nftables on loopback) cannot be used here, or None (probed by
    creating and deleting a table)."""
    nft = shutil.which("nft")
    if nft is None:
        return "nftables is not installed (apt-get install nftables)"
    name = f"electfsm_probe_{uuid.uuid4().hex[:8]}"
    made = subprocess.run([nft, "add", "table", "inet", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"nft cannot create a table here: {made.stderr.strip()[:200]}"
    subprocess.run([nft, "delete", "table", "inet", name], capture_output=True)
    return None


class PacketFilter:
    """nftables rules on loopback for one test, in a table of its own (removed on close).

    Only TCP packets to or from the given 127.0.0.1 ports are touched::

        with PacketFilter() as pf:
            pf.drop(port, direction="from_server")          # answers lost (half-open)
            pf.drop(port, direction="both", percent=20)     # 20 % packet loss
    """

    def __init__(self) -> None:
        nft = shutil.which("nft")
        if nft is None:
            raise RuntimeError("nftables is not installed")
        self.nft = nft
        self.table = f"electfsm_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._run("add", "table", "inet", self.table)
        self._run("add", "chain", "inet", self.table, "out",
                  "{ type filter hook output priority 0; policy accept; }")

    def _run(self, *args: str) -> None:
        subprocess.run([self.nft, *args], check=True, capture_output=True, text=True)

    def drop(self, port: int, *, direction: str = "both", percent: int = 100) -> None:
        """Drop packets of connections to ``port``: ``to_server`` (packets to it),
        ``from_server`` (packets from it) or ``both``; ``percent`` of them at random."""
        matches = {"to_server": [["dport"]], "from_server": [["sport"]],
                   "both": [["dport"], ["sport"]]}[direction]
        for (field,) in matches:
            rule = ["add", "rule", "inet", self.table, "out", "ip", "daddr", "127.0.0.1",
                    "tcp", field, str(port)]
            if percent < 100:
                rule += ["numgen", "random", "mod", "100", "<", str(percent)]
            self._run(*rule, "drop")

    def flush(self) -> None:
        self._run("flush", "chain", "inet", self.table, "out")

    def close(self) -> None:
        subprocess.run([self.nft, "delete", "table", "inet", self.table], capture_output=True)

    def __enter__(self) -> PacketFilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
