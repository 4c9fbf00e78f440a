"""Bad input is refused at construction with an error that says what to do."""

from __future__ import annotations

from typing import Any

import pytest

from electfsm import ConfigError, Elector

GOOD: dict[str, Any] = {"endpoints": ["127.0.0.1:2379"], "election": "jobs/scheduler",
                        "identity": "node-a", "ttl": 5}


@pytest.mark.parametrize(("change", "message"), [
    ({"election": ""}, "election name is empty"),
    ({"election": "   "}, "election name is empty"),
    ({"election": "jobs/"}, "ends with '/'"),
    ({"election": " jobs"}, "whitespace"),
    ({"election": "jobs\nx"}, "control characters"),
    ({"election": "jobs\0x"}, "control characters"),
    ({"election": 7}, "must be a str"),
    ({"election": "x" * 5000}, "the limit is 4096"),
    ({"ttl": "abc"}, "whole number of seconds"),
    ({"ttl": 2.5}, "whole number of seconds"),
    ({"ttl": 0}, "between 1 and"),
    ({"ttl": -3}, "between 1 and"),
    ({"ttl": True}, "whole number of seconds"),
    ({"identity": 42}, "must be str or bytes"),
    ({"identity": ""}, "identity is empty"),
    ({"identity": b"x" * (1024 * 1024 + 1)}, "limit is 1048576"),
    ({"endpoints": []}, "endpoints is empty"),
    ({"endpoints": ["nonsense:"]}, "is not host:port"),
    ({"endpoints": ["127.0.0.1"]}, "is not host:port"),
    ({"endpoints": ["127.0.0.1:99999"]}, "is not host:port"),
    ({"endpoints": ["unix:///tmp/etcd.sock"]}, "unix sockets"),
    ({"endpoints": ["http://a:1", "https://b:2"]}, "mix http"),
    ({"margin": 3.0}, "under half the ttl"),
    ({"margin": -1}, "positive number"),
    ({"call_timeout": 0}, "positive number"),
])
def test_bad_input_is_refused_with_a_clear_error(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Elector(**{**GOOD, **change})


def test_good_input_is_accepted_in_its_usual_forms() -> None:
    e = Elector(**{**GOOD, "endpoints": "127.0.0.1:2379,http://localhost:2380",
                   "identity": b"\xff\x00raw"})
    assert e.config.hosts == ("127.0.0.1:2379", "localhost:2380")
    assert e.config.identity == b"\xff\x00raw"
    assert e.state == "disconnected"
    e.stop()


def test_identity_of_exactly_one_mib_is_accepted() -> None:
    Elector(**{**GOOD, "identity": b"x" * (1024 * 1024)}).stop()


def test_config_error_is_a_value_error_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError):
        Elector(**{**GOOD, "ttl": 0})
