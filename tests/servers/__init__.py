"""Real servers for the test suite: mosquitto (MQTT) and FerretDB (MongoDB wire protocol).

`scripts/servers/prepare` installs or builds them. Each server runs as a child process on a free
loopback port, with its configuration, data and log in a directory the caller owns, and is always
stopped at the end (fixture finalizers, then an atexit safety net).

Pytest fixtures live in `tests.servers.fixtures`. When a server is missing the test is skipped,
unless `TWIN_TEST_REQUIRE_SERVERS=1` (set in CI) turns the skip into a failure: see
`tests.servers.require`.
"""
