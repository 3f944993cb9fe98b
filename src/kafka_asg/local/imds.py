"""The local region's instance metadata service: one HTTP server that answers each instance for itself.

An instance is identified by the source address of the request (its primary IP or any address of an ENI
attached to it), as every instance sees its own IMDS at 169.254.169.254 on AWS. IMDSv2 as documented in
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html: ``PUT
/latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600), then GETs carrying
``X-aws-ec2-metadata-token``; without a valid token a GET is 401 when the instance's ``HttpTokens`` is
``required``. Paths follow https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-categories.html.

The tree of one instance is a pure function of a frozen :class:`ImdsView`; where the views come from is an
:data:`ImdsSource` (the daemon builds them from moto's backends; tests pass a dict).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network

logger = logging.getLogger(__name__)

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL = 21600


@dataclass(frozen=True)
class ImdsNic:
    mac: str
    device_number: int
    interface_id: str
    subnet_id: str
    vpc_id: str
    subnet_cidr: IPv4Network
    local_ipv4s: tuple[IPv4Address, ...]


@dataclass(frozen=True)
class ImdsView:
    """Everything IMDS tells one instance about itself."""

    instance_id: str
    region: str
    az: str
    az_id: str
    local_ipv4: IPv4Address
    nics: tuple[ImdsNic, ...]  # the primary NIC (device 0) first
    tokens_required: bool
    role: str | None = None
    user_data: bytes | None = None
    lifecycle_state: str | None = "InService"  # None: not in an Auto Scaling group (the path is a 404)
    credentials: Mapping[str, str] = field(default_factory=dict)

    @property
    def mac(self) -> str:
        return self.nics[0].mac if self.nics else ""

    def addresses(self) -> set[IPv4Address]:
        found = {self.local_ipv4}
        for nic in self.nics:
            found.update(nic.local_ipv4s)
        return found


# Looks up the instance that owns a source address; None for an address no instance has.
ImdsSource = Callable[[IPv4Address], ImdsView | None]


def dummy_credentials(view: ImdsView, now: datetime) -> dict[str, str]:
    """Role credentials in the shape AWS returns them (moto accepts any key)."""
    return {
        "Code": "Success",
        "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "Type": "AWS-HMAC",
        "AccessKeyId": "ASIA" + view.instance_id.replace("i-", "").upper()[:16].ljust(16, "X"),
        "SecretAccessKey": "local-region-secret-" + view.instance_id,
        "Token": "local-region-token-" + view.instance_id,
        "Expiration": (now + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def metadata_tree(view: ImdsView, now: datetime) -> dict[str, str]:
    """``path below /latest/meta-data/`` -> body. Directories are listed by :func:`lookup`."""
    tree = {
        "instance-id": view.instance_id,
        "placement/availability-zone": view.az,
        "placement/availability-zone-id": view.az_id,
        "placement/region": view.region,
        "mac": view.mac,
        "local-ipv4": str(view.local_ipv4),
    }
    if view.lifecycle_state is not None:
        tree["autoscaling/target-lifecycle-state"] = view.lifecycle_state
    for nic in view.nics:
        base = f"network/interfaces/macs/{nic.mac}/"
        tree[base + "device-number"] = str(nic.device_number)
        tree[base + "interface-id"] = nic.interface_id
        tree[base + "subnet-id"] = nic.subnet_id
        tree[base + "vpc-id"] = nic.vpc_id
        tree[base + "subnet-ipv4-cidr-block"] = str(nic.subnet_cidr)
        tree[base + "local-ipv4s"] = "\n".join(str(a) for a in nic.local_ipv4s)
        tree[base + "mac"] = nic.mac
    if view.role:
        creds = dict(view.credentials) or dummy_credentials(view, now)
        tree[f"iam/security-credentials/{view.role}"] = json.dumps(creds, indent=2)
    return tree


def lookup(view: ImdsView, path: str, now: datetime) -> str | None:
    """The body for a GET of ``path`` (below ``/latest/``), or None for 404. Directories list their entries,
    sub-directories with a trailing slash, as IMDS does."""
    if path == "user-data":
        return None if view.user_data is None else view.user_data.decode("utf-8", "replace")
    if path in ("meta-data", "meta-data/"):
        path = "meta-data/"
    if not path.startswith("meta-data/"):
        return None
    rel = path[len("meta-data/") :]
    tree = metadata_tree(view, now)
    if rel in tree:
        return tree[rel]
    prefix = rel if rel.endswith("/") or rel == "" else rel + "/"
    entries: dict[str, None] = {}
    for key in tree:
        if key.startswith(prefix):
            head, slash, _ = key[len(prefix) :].partition("/")
            entries[head + slash] = None
    return "\n".join(entries) if entries else None


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class ImdsService:
    """The request logic: tokens, the 401 rule, and the tree. Transport-free for unit tests."""

    def __init__(self, source: ImdsSource, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (instance id, expiry)
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, headers: Mapping[str, str], source_ip: str) -> Reply:
        try:
            view = self.source(IPv4Address(source_ip))
        except ValueError:
            view = None
        if view is None:
            return Reply(404, b"no instance has this address\n")
        path = path.split("?", 1)[0]
        if method == "PUT":
            if path != "/latest/api/token":
                return Reply(405, b"")
            return self._issue_token(view, headers)
        if method != "GET":
            return Reply(405, b"")
        token = _header(headers, TOKEN_HEADER)
        if token is not None and not self._valid(token, view.instance_id):
            return Reply(401, b"")
        if token is None and view.tokens_required:
            # HttpTokens=required: IMDSv1 requests are refused with 401.
            return Reply(401, b"")
        if not path.startswith("/latest/"):
            return Reply(200, b"latest\n") if path in ("/", "") else Reply(404, b"")
        body = lookup(view, path[len("/latest/") :], datetime.now(UTC))
        if body is None:
            return Reply(404, b"")
        return Reply(200, body.encode())

    def _issue_token(self, view: ImdsView, headers: Mapping[str, str]) -> Reply:
        raw = _header(headers, TTL_HEADER)
        try:
            ttl = int(raw) if raw is not None else -1
        except ValueError:
            ttl = -1
        if not 1 <= ttl <= MAX_TTL:
            return Reply(400, b"")
        token = secrets.token_urlsafe(40)
        with self._lock:
            now = self.clock()
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (view.instance_id, now + ttl)
        return Reply(200, token.encode(), ((TTL_HEADER, str(ttl)),))

    def _valid(self, token: str, instance_id: str) -> bool:
        with self._lock:
            entry = self._tokens.get(token)
        return entry is not None and entry[0] == instance_id and entry[1] > self.clock()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _ImdsHttpServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, the body waits for the client's delayed ACK (40 ms
    # on Linux) on every kept-alive request: the agent's credential fetch took 90 ms instead of 3.
    disable_nagle_algorithm = True

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        reply = self.server.service.handle(method, self.path, dict(self.headers.items()), self.client_address[0])
        self.send_response(reply.status)
        for key, value in reply.headers:
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("imds %s: %s", self.client_address[0], format % args)


class _ImdsHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, service: ImdsService) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.service = service


class ImdsServer:
    """Serves an :class:`ImdsService` on an already listening socket, in a background thread."""

    def __init__(self, sock: socket.socket, service: ImdsService) -> None:
        self._server = _ImdsHttpServer(sock, service)
        self._thread = threading.Thread(target=self._server.serve_forever, name="imds", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.socket.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
