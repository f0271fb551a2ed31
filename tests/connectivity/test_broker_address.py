"""Broker URLs as the device library and the service read them (``BrokerAddress.parse``)."""

from __future__ import annotations

import pytest

from connectivity.options import BrokerAddress

SECRET = "s3cr%40t-pw"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", BrokerAddress("broker", 1883, tls=False)),
        ("mqtts://broker", BrokerAddress("broker", 8883, tls=True)),
        ("mqtt://10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884, tls=False)),
        ("mqtts://[::1]:8884", BrokerAddress("::1", 8884, tls=True)),
        (
            f"mqtt://device%2F1:{SECRET}@broker",
            BrokerAddress("broker", 1883, tls=False, username="device/1", password="s3cr@t-pw"),
        ),
        ("mqtt://user@broker", BrokerAddress("broker", 1883, tls=False, username="user")),
    ],
)
def test_a_broker_url_gives_host_port_tls_and_credentials(
    url: str, expected: BrokerAddress
) -> None:
    assert BrokerAddress.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            f"http://device:{SECRET}@broker",
            "broker URL must start with mqtt:// or mqtts://, not http",
        ),
        (f"broker:{SECRET}", "broker URL must start with mqtt:// or mqtts://, not broker"),
        (f"mqtt://device:{SECRET}@", "broker URL has no host"),
        (f"mqtt://device:{SECRET}@broker:99999", "broker URL has a port that is not a number"),
        (f"mqtt://device:{SECRET}@broker:port", "broker URL has a port that is not a number"),
        # Once read as "no port": the default, 1883, without a word.
        (f"mqtt://device:{SECRET}@broker:0", "broker URL has port 0"),
        (f"mqtts://device:{SECRET}@broker:00", "broker URL has port 0"),
        (f"mqtt://device:ab/{SECRET}@broker", "broker URL has a '/', '?' or '#' before its '@'"),
        (f"mqtt://device:1/{SECRET}@broker", "broker URL has a '/', '?' or '#' before its '@'"),
    ],
)
def test_a_bad_broker_url_is_refused_without_repeating_it(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        BrokerAddress.parse(url)
    assert str(caught.value).startswith(message)
    assert SECRET not in str(caught.value) and "s3cr" not in str(caught.value)
