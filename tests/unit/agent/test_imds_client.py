"""HttpImds against a tiny IMDSv2 served on 127.0.0.1 in the test (cloud-init's ``register_mock_metaserver``
idea: a dict becomes the URL tree). Real HTTP, real urllib; only the sleep of the retry policy is skipped."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network

import pytest

from kafka_asg.agent.imds import HttpImds
from kafka_asg.errors import CloudError, Unavailable
from kafka_asg.retry import Retry

MAC = "02:00:00:aa:00:01"
META = {
    "instance-id": "i-0abc",
    "placement/region": "eu-west-1",
    "placement/availability-zone": "eu-west-1b",
    "placement/availability-zone-id": "euw1-az2",
    "mac": MAC,
    "local-ipv4": "10.0.0.25",
    f"network/interfaces/macs/{MAC}/subnet-id": "subnet-1b",
    f"network/interfaces/macs/{MAC}/subnet-ipv4-cidr-block": "10.0.0.16/28",
    f"network/interfaces/macs/{MAC}/vpc-id": "vpc-1",
    "network/interfaces/macs/02:00:00:00:01:02/device-number": "1",
}


class FakeMetaServer:
    """IMDSv2: tokens from PUT /latest/api/token, GETs need a valid one. Knobs for failure injection."""

    def __init__(self) -> None:
        self.meta = dict(META)
        self.valid_tokens: set[str] = set()
        self.token_puts = 0
        self.ttl_headers: list[str | None] = []
        self.put_status: int | None = None  # e.g. 403: IMDS disabled
        self.get_failures: list[int] = []  # statuses answered to the next GETs (e.g. 503)
        self.expire_after_next_get = False
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                server.requests.append(f"PUT {self.path}")
                if self.path != "/latest/api/token":
                    return self._answer(404)
                server.token_puts += 1
                server.ttl_headers.append(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
                if server.put_status is not None:
                    return self._answer(server.put_status)
                token = f"SECRET-TOKEN-{server.token_puts}-AQAEAxyz"
                server.valid_tokens.add(token)
                return self._answer(200, token)

            def do_GET(self) -> None:
                server.requests.append(f"GET {self.path}")
                if server.get_failures:
                    return self._answer(server.get_failures.pop(0))
                if self.headers.get("X-aws-ec2-metadata-token") not in server.valid_tokens:
                    return self._answer(401)
                if server.expire_after_next_get:
                    server.valid_tokens.clear()
                    server.expire_after_next_get = False
                    return self._answer(401)
                key = self.path.removeprefix("/latest/meta-data/")
                if key not in server.meta:
                    return self._answer(404)
                return self._answer(200, server.meta[key])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def tokens_issued(self) -> list[str]:
        return [f"SECRET-TOKEN-{n}-AQAEAxyz" for n in range(1, self.token_puts + 1)]


@pytest.fixture
def metaserver() -> Iterator[FakeMetaServer]:
    server = FakeMetaServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


FAST = Retry(deadline=2.0, delay=0.01, max_delay=0.05, sleep=lambda s: None)


def client(url: str) -> HttpImds:
    return HttpImds(url, timeout=2.0, retry=FAST)


def test_token_flow_and_identity(metaserver: FakeMetaServer) -> None:
    imds = client(metaserver.url)
    ident = imds.identity()
    assert ident.instance_id == "i-0abc"
    assert (ident.region, ident.az, ident.az_id) == ("eu-west-1", "eu-west-1b", "euw1-az2")
    assert ident.subnet_id == "subnet-1b"
    assert ident.subnet_cidr == IPv4Network("10.0.0.16/28")
    assert ident.local_ipv4 == IPv4Address("10.0.0.25")
    assert metaserver.token_puts == 1  # one token, reused for every GET
    assert metaserver.ttl_headers == ["21600"]
    assert metaserver.requests[0] == "PUT /latest/api/token"
    imds.identity()  # cached: no new requests
    assert metaserver.requests.count("GET /latest/meta-data/instance-id") == 1


def test_base_url_from_environment(metaserver: FakeMetaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_ASG_IMDS_URL", metaserver.url)
    assert HttpImds(retry=FAST).identity().instance_id == "i-0abc"


def test_missing_items_are_none(metaserver: FakeMetaServer) -> None:
    imds = client(metaserver.url)
    assert imds.target_lifecycle_state() is None
    metaserver.meta["autoscaling/target-lifecycle-state"] = "Warmed:Stopped"
    assert imds.target_lifecycle_state() == "Warmed:Stopped"
    assert imds.nic_device_number("02:00:00:00:01:02") == 1
    assert imds.nic_device_number("02:00:00:00:09:09") is None


def test_the_lifecycle_state_is_reused_for_a_moment(metaserver: FakeMetaServer) -> None:
    now = [100.0]
    imds = HttpImds(metaserver.url, retry=FAST, lifecycle_max_age=0.9, clock=lambda: now[0])
    path = "GET /latest/meta-data/autoscaling/target-lifecycle-state"
    metaserver.meta["autoscaling/target-lifecycle-state"] = "InService"
    assert imds.target_lifecycle_state() == "InService"
    metaserver.meta["autoscaling/target-lifecycle-state"] = "Warmed:Stopped"
    now[0] += 0.5
    assert imds.target_lifecycle_state() == "InService"  # reused within 0.9 s
    assert metaserver.requests.count(path) == 1
    now[0] += 0.5
    assert imds.target_lifecycle_state() == "Warmed:Stopped"  # read again
    assert metaserver.requests.count(path) == 2


def test_stale_token_is_refreshed_once(metaserver: FakeMetaServer) -> None:
    imds = client(metaserver.url)
    assert imds.target_lifecycle_state() is None
    metaserver.expire_after_next_get = True
    metaserver.meta["autoscaling/target-lifecycle-state"] = "InService"
    assert imds.target_lifecycle_state() == "InService"
    assert metaserver.token_puts == 2


def test_token_rejected_twice_fails(metaserver: FakeMetaServer) -> None:
    imds = client(metaserver.url)
    metaserver.get_failures = [401, 401]
    with pytest.raises(CloudError, match="401 twice"):
        imds.target_lifecycle_state()
    assert metaserver.token_puts == 2


def test_forbidden_token_fails_fast(metaserver: FakeMetaServer) -> None:
    metaserver.put_status = 403
    with pytest.raises(CloudError, match=r"IMDS refused PUT .* \(403\)"):
        client(metaserver.url).identity()
    assert metaserver.token_puts == 1  # no retry: waiting cannot fix a 403


def test_throttling_503_is_retried(metaserver: FakeMetaServer) -> None:
    metaserver.get_failures = [503, 503]
    assert client(metaserver.url).identity().instance_id == "i-0abc"


def test_unreachable_imds_is_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    retry = Retry(deadline=0.5, delay=0.01, max_delay=0.05, sleep=lambda s: None, max_tries=3)
    with pytest.raises(Unavailable, match="unreachable"):
        HttpImds(f"http://127.0.0.1:{port}", retry=retry).identity()


def test_token_is_never_logged(metaserver: FakeMetaServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    imds = client(metaserver.url)
    imds.identity()
    metaserver.expire_after_next_get = True
    imds.target_lifecycle_state()
    metaserver.get_failures = [401, 401]
    with pytest.raises(CloudError) as failure:
        imds.target_lifecycle_state()
    tokens = metaserver.tokens_issued()
    assert len(tokens) == 3
    assert caplog.records  # there was logging to check (refresh, retries)
    text = "\n".join(r.getMessage() for r in caplog.records) + str(failure.value)
    for token in tokens:
        assert token not in text
