"""electfsm.testing.plugin, used as a user would: a fresh test file run by a fresh pytest.

Most runs point the plugin at this session's etcd (``--electfsm-endpoints``) so that they start
no server of their own; those about ``etcd_proc``, ``etcd_cluster`` and xdist start theirs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from electfsm.etcd import EtcdClient, prefix_end
from electfsm.testing.etcd_binaries import ETCD_BIN_ENV, find_etcd_binary
from electfsm.testing.local_etcd import LocalEtcd

pytest_plugins = ["pytester"]

MISSING = "/nonexistent/electfsm-test/etcd"


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", *args, timeout=90)


def test_importing_the_plugin_pulls_in_no_grpc_etcd3_or_elector() -> None:
    heavy = ["grpc", "etcd3", "transitions", "electfsm.elector", "electfsm.etcd", "anyio"]
    code = ("import json, sys; import electfsm.testing.plugin; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []


def test_every_fixture_works_in_a_users_test_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from electfsm.etcd import EtcdClient
        from electfsm.testing.harness import Harness

        def test_etcd_proc_is_a_running_server(etcd_proc, etcd_endpoint, etcd_endpoints):
            assert etcd_proc.pid is not None
            assert etcd_endpoints == [etcd_proc.endpoint] and etcd_endpoint == etcd_proc.endpoint

        def test_one_leads_the_other_follows(elector_factory):
            a = elector_factory("node-a", ttl=2)
            assert a.wait_for("leader", timeout=10)
            b = elector_factory("node-b", ttl=2)
            assert b.wait_for("follower", timeout=10)
            assert b.leader.identity == "node-a"

        @pytest.mark.anyio
        async def test_async_elector_leads(async_elector_factory):
            a = await async_elector_factory("node-a", ttl=2)
            assert await a.wait_for("leader", timeout=10)

        def test_the_harness_elects_on_a_virtual_clock(elector_harness):
            assert isinstance(elector_harness, Harness)
            assert elector_harness.election.startswith("pytest/main/")
            elector_harness.connect()
            elector_harness.elect()
            assert elector_harness.state == "leader"

        def test_a_blackholed_proxy_cuts_the_client_off(fault_proxy):
            proxy = fault_proxy()
            client = EtcdClient([proxy.endpoint], timeout=0.5)
            try:
                client.put(b"plugin-proxy", b"1")
                proxy.blackhole()
                with pytest.raises(Exception):
                    client.range(b"plugin-proxy")
                proxy.pass_through()
            finally:
                client.close()

        def test_a_proxy_left_blackholed_is_healed_before_the_electors_stop(
                elector_factory, fault_proxy):
            proxy = fault_proxy()
            a = elector_factory("node-a", ttl=2, endpoints=[proxy.endpoint])
            assert a.wait_for("leader", timeout=10)
            proxy.blackhole()  # stop() could not revoke the lease through this

        def test_a_cluster_elects_through_a_killed_member(etcd_cluster, elector_factory):
            assert len(etcd_cluster.members) == 3
            a = elector_factory("node-a", ttl=2, endpoints=etcd_cluster.endpoints)
            assert a.wait_for("leader", timeout=10)
            victim = etcd_cluster.members[etcd_cluster.leader_index(timeout=5)]
            victim.kill()
            try:
                assert etcd_cluster.wait_for_leader(timeout=10) is not None
            finally:
                victim.restart()
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=8)  # the async test runs on asyncio and on trio


LEAKS = """
    import threading
    import pytest
    from electfsm.etcd import EtcdClient

    def test_clean(elector_factory):
        assert elector_factory("node-a", ttl=2).wait_for("leader", timeout=10)

    def test_leaks_a_key(elector_factory, etcd_endpoint):
        assert elector_factory("node-a", ttl=2).wait_for("leader", timeout=10)
        client = EtcdClient([etcd_endpoint], timeout=5)
        client.put((elector_factory.election + "/stray").encode(), b"no lease")
        client.close()

    def test_leaks_a_lease(elector_factory):
        a = elector_factory("node-a", ttl=2)
        assert a.wait_for("leader", timeout=10)
        a.stop(revoke=False)

    def test_leaks_a_thread(elector_factory):
        # work that ignores the end of its term outlives stop(): its thread is left running
        a = elector_factory("node-a", ttl=2, work_grace=0.1, start=False)
        a.run_while_leader(lambda term: threading.Event().wait(4))
        a.start()
        assert a.wait_for("leader", timeout=10)

    @pytest.mark.anyio
    async def test_async_leaks_a_lease(async_elector_factory):
        a = await async_elector_factory("node-a", ttl=2)
        assert await a.wait_for("leader", timeout=10)
        await a.stop(revoke=False)
"""


def test_a_leftover_key_lease_or_thread_errors_the_test_at_teardown(
        pytester: pytest.Pytester, etcd: LocalEtcd) -> None:
    pytester.makepyfile(test_leaks=LEAKS)
    result = run(pytester, f"--electfsm-endpoints={etcd.endpoint}")
    result.assert_outcomes(passed=6, errors=5)  # the async test on asyncio and trio
    result.stdout.fnmatch_lines([
        "electfsm: election 'pytest/main/test_leaks_a_key-*' left behind keys *-*/stray*",
        "electfsm: election 'pytest/main/test_leaks_a_lease-*' left behind keys *, live leases *",
        "electfsm: election 'pytest/main/test_leaks_a_thread-*' left behind threads"
        " *electfsm-work?pytest/main/test_leaks_a_thread-*",
        "electfsm: election 'pytest/main/test_async_leaks_a_lease_asyncio_-*' left behind*"
        " live leases *",
        "electfsm: election 'pytest/main/test_async_leaks_a_lease_trio_-*' left behind*"
        " live leases *",
    ])
    result.stdout.no_fnmatch_line("*test_clean*left behind*")
    # what was left is cleaned up for the tests after it
    client = EtcdClient([etcd.endpoint], timeout=5)
    try:
        prefix = b"pytest/main/test_leaks"
        assert list(client.range(prefix, prefix_end(prefix)).kvs) == []
    finally:
        client.close()


def test_two_tests_never_share_an_election(pytester: pytest.Pytester, etcd: LocalEtcd) -> None:
    pytester.makepyfile(
        f"""
        import pathlib
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_alone(elector_factory, n):
            a = elector_factory(f"node-{{n}}", ttl=2)
            assert a.wait_for("leader", timeout=10), "no candidate of another test in the way"
            pathlib.Path(r"{pytester.path}", f"election-{{n}}").write_text(a.config.election)
        """
    )
    result = run(pytester, f"--electfsm-endpoints={etcd.endpoint}")
    result.assert_outcomes(passed=2)
    names = {p.read_text() for p in pytester.path.glob("election-*")}
    assert len(names) == 2
    assert all(n.startswith("pytest/main/test_alone_") for n in names)


def test_the_endpoints_flag_uses_a_running_etcd_and_starts_none(
        pytester: pytest.Pytester, etcd: LocalEtcd) -> None:
    pytester.makepyfile(
        f"""
        def test_on_the_given_etcd(elector_factory, etcd_endpoints, fault_proxy):
            assert etcd_endpoints == ["{etcd.endpoint}"]
            assert elector_factory("node-a", ttl=2).wait_for("leader", timeout=10)
            assert fault_proxy().upstream == "{etcd.endpoint}"
        """
    )
    # the binary does not exist: starting etcd_proc would error the test
    result = run(pytester, f"--electfsm-endpoints={etcd.endpoint}",
                 f"--electfsm-etcd-binary={MISSING}")
    result.assert_outcomes(passed=1)


def test_the_flag_beats_the_ini_key_and_a_fixture_param_beats_the_flag(
        pytester: pytest.Pytester, etcd: LocalEtcd) -> None:
    pytester.makeini(
        f"""
        [pytest]
        electfsm_endpoints = 127.0.0.1:1
        electfsm_etcd_binary = {MISSING}
        """
    )
    pytester.makepyfile(
        f"""
        import pytest

        def test_the_flag_wins(etcd_endpoint):
            assert etcd_endpoint == "{etcd.endpoint}"

        @pytest.mark.parametrize("etcd_proc", [{{"binary": "{find_etcd_binary()}"}}],
                                 indirect=True)
        def test_the_param_wins(etcd_proc):
            assert etcd_proc.pid is not None

        def test_the_ini_key_otherwise(etcd_proc):
            pass
        """
    )
    result = run(pytester, f"--electfsm-endpoints={etcd.endpoint}")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([f"*{MISSING}*does not exist*"])
    # and without the flag, the ini key is what the fixture gives
    pytester.makepyfile(test_ini="def test_ini(etcd_endpoint):\n"
                                 "    assert etcd_endpoint == '127.0.0.1:1'\n")
    run(pytester, "test_ini.py").assert_outcomes(passed=1)


def test_a_missing_binary_that_was_asked_for_errors_saying_so(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_needs_etcd(etcd_proc):\n    pass\n")
    result = run(pytester, f"--electfsm-etcd-binary={MISSING}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*etcd binary asked for is unusable*{MISSING}*does not exist*--electfsm-etcd-binary*"])


def test_no_etcd_installed_skips_saying_what_to_install(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide every etcd the lookup would find: the environment, the wheel and PATH.
    monkeypatch.delenv(ETCD_BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(pytester.mkdir("empty-path")))
    pytester.makeconftest(
        """
        import electfsm.testing.etcd_binaries as binaries
        binaries._distro_bin_dirs = lambda: []
        """
    )
    pytester.makepyfile("def test_needs_etcd(etcd_proc):\n    pass\n")
    result = run(pytester)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*no etcd to start*pip install 'electfsm?etcd?'*"
                                 "--electfsm-etcd-binary*--electfsm-endpoints*"])


def test_two_xdist_workers_each_run_their_own_etcd(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        import json
        import pathlib
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_leads(elector_factory, etcd_endpoint, n):
            assert elector_factory(f"node-{{n}}", ttl=2).wait_for("leader", timeout=10)
            out = pathlib.Path(r"{pytester.path}", f"seen-{{n}}.json")
            out.write_text(json.dumps([elector_factory.election, etcd_endpoint]))
        """
    )
    result = run(pytester, "-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=4)
    seen = [json.loads(p.read_text()) for p in pytester.path.glob("seen-*.json")]
    assert len(seen) == 4
    workers = {election.split("/")[1] for election, _ in seen}
    assert workers == {"gw0", "gw1"}
    assert len({endpoint for _, endpoint in seen}) == 2, "one etcd per worker"
