"""The user data's stdlib fetcher: it signs exactly as botocore does (SigV4, path-style, session token), speaks
HTTP/1.1 (keep-alive, sized, chunked and close-delimited bodies), and fetches the agent and runs it in its own
Python, or the one fetched before when S3 is out of reach; the user data carries exactly this module."""

from __future__ import annotations

import ast
import datetime
import http.server
import json
import socket
import subprocess
import sys
import threading
import zipapp
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kafka_asg import s3get
from kafka_asg.config import ClusterConfig
from kafka_asg.userdata import AGENT_PYTHON_FLAGS, USER_DATA_LIMIT, fetcher_source, render_user_data

CREDS = {"AccessKeyId": "AKIDEXAMPLE", "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG", "Token": "session-token"}
NOW = datetime.datetime(2026, 11, 25, 12, 0, 0, tzinfo=datetime.UTC)


def botocore_authorization(url: str, region: str) -> str:
    request = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": s3get.EMPTY_SHA256})
    signer = S3SigV4Auth(Credentials(CREDS["AccessKeyId"], CREDS["SecretAccessKey"], CREDS["Token"]), "s3", region)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        signer.add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize(
    ("bucket", "key"),
    [
        ("com.example.event-servers", "agent/kafka-asg-agent.pyz"),
        ("bucket", "archives/kafka_2.13-3.9.2.tgz"),
        ("bucket", "dir/with space+plus.txt"),
    ],
)
def test_signature_matches_botocore(bucket: str, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    url = s3get.object_url(bucket, key, "eu-west-1")
    assert url.startswith("https://s3.eu-west-1.amazonaws.com/" + bucket + "/")
    ours = s3get.sigv4_headers("GET", url, "eu-west-1", "s3", CREDS, now=NOW)
    assert ours["authorization"] == botocore_authorization(url, "eu-west-1")
    assert ours["x-amz-security-token"] == "session-token"


@pytest.mark.parametrize("service", ["ec2", "autoscaling"])
def test_query_api_post_signature_matches_botocore(service: str) -> None:
    # The node agent's EC2 and Auto Scaling calls: a form-encoded POST to "/", signed with the body's hash.
    url = f"https://{service}.eu-west-1.amazonaws.com/"
    body = b"Action=DescribeVolumes&Version=2016-11-15&Filter.1.Name=tag%3Akafka-asg%3Aslot&Filter.1.Value.1=2"
    content_type = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
    ours = s3get.sigv4_headers("POST", url, "eu-west-1", service, CREDS, now=NOW, body=body, headers=content_type)
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": content_type["content-type"]})
    signer = SigV4Auth(
        Credentials(CREDS["AccessKeyId"], CREDS["SecretAccessKey"], CREDS["Token"]), service, "eu-west-1"
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


def test_endpoint_override_is_path_style(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.1:4566/")
    assert s3get.object_url("com.example.event-servers", "a/b", "eu-west-1") == (
        "http://10.0.0.1:4566/com.example.event-servers/a/b"
    )


@pytest.fixture
def seed_like(tmp_path: Path) -> Iterator[ClusterConfig]:
    from ipaddress import IPv4Address, IPv4Network

    from kafka_asg import config as c

    subnet = c.Subnet("eu-west-1b", IPv4Network("10.0.0.16/28"))
    yield c.ClusterConfig(
        name="event-servers", region="eu-west-1", mode="zookeeper", vpc_cidr=IPv4Network("10.0.0.0/26"), vpc_id=None,
        subnets=(subnet,), slots=(c.Slot(2, "eu-west-1b", IPv4Address("10.0.0.21"), subnet),), ports=c.Ports(),
        bucket="com.example.event-servers", zookeeper_config=tmp_path / "z", kafka_config=tmp_path / "k",
        zookeeper=c.ServerSpec("3.8.7", "archives/z.tgz"), kafka=c.ServerSpec("3.9.2", "archives/k.tgz"),
        volumes="per-slot", volume=c.VolumeSpec(), instance_type="m6i.large", ami="ami-1",
        asg=c.AsgSize(2, 3, 4), bastion_security_group=None,
    )  # fmt: skip


def test_user_data_is_valid_sh_and_small(seed_like: ClusterConfig, tmp_path: Path) -> None:
    script = render_user_data(seed_like)
    assert len(script.encode()) < USER_DATA_LIMIT // 2
    path = tmp_path / "ud.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert "BUCKET=com.example.event-servers" in script
    # The service runs the fetcher, isolated and without the system's site-packages, and the agent in it.
    assert 'ARGS="run --bucket $BUCKET --region $REGION --cluster $CLUSTER"' in script
    assert 'RUN="$PY -I -S $FETCHER $BUCKET agent/kafka-asg-agent.pyz $AGENT $REGION $ARGS"' in script
    assert "ExecStart=$RUN" in script
    assert 'setsid sh -c "while :; do $RUN; echo' in script
    # The embedded fetcher, as the user data's own commands write it, is the module without its docstrings.
    decode = script[script.index("base64 -d <<'S3GET'") : script.index('mv "$FETCHER.part" "$FETCHER"')]
    fetcher = tmp_path / "s3get.py"
    subprocess.run(["sh", "-euc", f"FETCHER={fetcher}\n{decode}mv $FETCHER.part $FETCHER"], check=True)
    assert fetcher.read_text() == fetcher_source()
    system_python = Path("/usr/bin/python3.11")  # what an instance may run (fetcher_source never unparses)
    if system_python.exists():
        subprocess.run([str(system_python), "-I", "-S", "-m", "py_compile", str(fetcher)], check=True)
    assert ast.dump(ast.parse(fetcher.read_text())) == ast.dump(without_docstrings(Path(s3get.__file__).read_text()))


def without_docstrings(source: str) -> ast.Module:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
    return tree


# ------------------------------------------------------------------------------------------- HTTP


class RawServer:
    """Answers the requests of each connection with the next raw answers of ``script``; ``"close"`` closes it
    unanswered, ``(answer,)`` closes it after the answer."""

    def __init__(self, script: list[bytes | str | tuple[bytes]]) -> None:
        self.script, self.requests, self.connections = script, list[bytes](), 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.script:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn, conn.makefile("rb") as stream:
                while self.script:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = stream.readline()
                        if not line:
                            break
                        head += line
                    if not head:
                        break
                    size = next(
                        (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                        0,
                    )
                    self.requests.append(head + stream.read(size))
                    answer = self.script.pop(0)
                    if answer == "close":
                        break
                    assert not isinstance(answer, str)
                    conn.sendall(answer[0] if isinstance(answer, tuple) else answer)
                    if isinstance(answer, tuple):
                        break


def ok(body: bytes, *headers: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + "".join(f"{h}\r\n" for h in headers).encode() + b"\r\n" + body


def test_one_connection_carries_sized_chunked_and_headless_answers() -> None:
    chunked = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nx-trailer: t\r\n\r\n"
    server = RawServer(
        [
            ok(b"hello", "Content-Length: 5", "X-Twice: a", "x-twice: b"),
            ok(chunked, "Transfer-Encoding: chunked"),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            ok(b"", "Content-Length: 7"),  # a HEAD answer: the length of what a GET would get, no body
        ]
    )
    conn = s3get.Connection("http", f"127.0.0.1:{server.port}", 5.0)
    first = conn.request("GET", "/a", headers={"x-amz-date": "now"})
    assert (first.status, first.headers["x-twice"], first.read(2), first.read(), first.read()) == (
        200, "a, b", b"he", b"llo", b""
    )  # fmt: skip
    second = conn.request("POST", "/b", b"form=1")
    assert second.read(3) + second.read(3) + second.read() == b"Wikipedia"
    assert (conn.request("GET", "/c").status, conn.request("HEAD", "/d").read()) == (204, b"")
    assert server.connections == 1  # keep-alive throughout
    assert server.requests[0].startswith(b"GET /a HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"x-amz-date: now\r\n" in server.requests[0]
    assert server.requests[1].endswith(b"content-length: 6\r\n\r\nform=1")
    conn.close()


def test_a_short_or_cut_answer_is_an_error_and_a_closed_connection_says_so() -> None:
    server = RawServer(
        [
            (ok(b"abc", "Content-Length: 10"),),
            "close",
            (ok(b"x", "Content-Length: ten"),),
            (ok(b"rest", "Connection: close"),),
        ]
    )
    conn = s3get.Connection("http", f"127.0.0.1:{server.port}", 5.0)
    with pytest.raises(s3get.HttpError, match="broke off 7 bytes short"):
        conn.request("GET", "/").read()
    conn.close()
    with pytest.raises(ConnectionResetError, match="closed the connection before answering"):
        conn.request("GET", "/")
    conn.close()
    with pytest.raises(s3get.HttpError, match="bad content-length 'ten'"):
        conn.request("GET", "/")
    conn.close()
    last = conn.request("GET", "/")
    assert (last.will_close, last.read()) == (True, b"rest")  # delimited by the close
    conn.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 \xb200 OK\r\n\r\n", "not an HTTP answer"),  # a digit to str.isdigit, not to HTTP
        (ok(b"x", "Content-Length: \xb2"), "bad content-length"),
        (ok(b"-2\r\nab\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), "bad chunk size line"),
        (ok(b"0x2\r\nab\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), "bad chunk size line"),
        (b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * 70000 + b"\r\n\r\n", "longer than 65536 bytes"),
    ],
)
def test_malformed_answers_are_http_errors(answer: bytes, error: str) -> None:
    server = RawServer([(answer,)])
    conn = s3get.Connection("http", f"127.0.0.1:{server.port}", 5.0)
    with pytest.raises(s3get.HttpError, match=error):
        conn.request("GET", "/").read()
    conn.close()


def test_an_http10_answer_closes_unless_kept_alive_and_interim_answers_are_skipped() -> None:
    server = RawServer(
        [
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nb",
            b"HTTP/1.1 100 Continue\r\n\r\n" * 3 + ok(b"c", "Content-Length: 1", "Connection: keep-alive, close"),
        ]
    )
    conn = s3get.Connection("http", f"127.0.0.1:{server.port}", 5.0)
    first = conn.request("GET", "/")
    assert (first.will_close, first.read()) == (True, b"a")
    second = conn.request("GET", "/")
    assert (second.will_close, second.read()) == (False, b"b")
    third = conn.request("GET", "/")
    assert (third.status, third.will_close, third.read()) == (200, True, b"c")
    conn.close()


# ---------------------------------------------------------------------------------- the fetcher


class Aws(http.server.BaseHTTPRequestHandler):
    """IMDS (a token, a role, its credentials) and S3 (one object, chunked; or 503 when ``down``)."""

    protocol_version = "HTTP/1.1"
    objects: dict[str, bytes] = {}
    down = False

    def _send(self, status: int, body: bytes, chunked: bool = False) -> None:
        self.send_response(status)
        if chunked:
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 1000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_PUT(self) -> None:
        self._send(200, b"imds-token")

    def do_GET(self) -> None:
        if self.path.startswith("/latest/meta-data/iam/security-credentials/"):
            assert self.headers["x-aws-ec2-metadata-token"] == "imds-token"
            role = self.path.rsplit("/", 1)[1]
            self._send(
                200,
                json.dumps({"AccessKeyId": "A", "SecretAccessKey": "S", "Token": "T"}).encode()
                if role
                else b"the-role",
            )
        elif type(self).down:
            self._send(503, b"<Error><Code>SlowDown</Code></Error>")
        elif self.path in type(self).objects and self.headers["authorization"].startswith(
            "AWS4-HMAC-SHA256 Credential=A/"
        ):
            self._send(200, type(self).objects[self.path], chunked=True)
        else:
            self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def aws() -> Iterator[tuple[str, type[Aws]]]:
    handler = type("Handler", (Aws,), {"objects": {}, "down": False})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_the_fetcher_runs_the_agent_in_its_own_python_or_the_one_it_fetched_before(
    aws: tuple[str, type[Aws]], tmp_path: Path
) -> None:
    url, handler = aws
    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text(
        # hmac: imported by the fetcher, not by this app: the app runs in the fetcher's interpreter.
        "import sys\nprint(__name__, sys.argv[1:], 'hmac' in sys.modules)\nraise SystemExit(3)\n"
    )
    zipapp.create_archive(app, tmp_path / "agent.pyz")
    handler.objects["/bkt/agent/agent.pyz"] = (tmp_path / "agent.pyz").read_bytes()
    fetcher = tmp_path / "fetcher.py"
    fetcher.write_text(fetcher_source())  # what the user data writes on an instance
    dest = tmp_path / "opt" / "agent.pyz"
    dest.parent.mkdir()
    argv = [sys.executable, *AGENT_PYTHON_FLAGS, str(fetcher), "bkt", "agent/agent.pyz", str(dest), "eu-west-1"]
    env = {"KAFKA_ASG_IMDS_URL": url, "AWS_ENDPOINT_URL": url, "PATH": "/usr/bin:/bin"}

    ran = subprocess.run([*argv, "run", "--flag"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (ran.returncode, ran.stdout) == (3, "__main__ ['run', '--flag'] True\n"), ran.stderr
    assert dest.read_bytes() == handler.objects["/bkt/agent/agent.pyz"]

    handler.down = True  # a restart while S3 is out of reach: the agent fetched before runs
    ran = subprocess.run([*argv, "run"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (ran.returncode, ran.stdout) == (3, "__main__ ['run'] True\n"), ran.stderr
    assert "gave up after 2 attempts: HTTP 503; running the agent fetched earlier" in ran.stderr

    handler.down = False
    missing = [*argv[:4], "bkt", "agent/none.pyz", str(tmp_path / "none.pyz"), "eu-west-1"]
    ran = subprocess.run(missing, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (ran.returncode, ran.stderr.strip()) == (
        1, "s3get: s3://bkt/agent/none.pyz: HTTP 404 (missing object or no permission)"
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- TLS


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for "localhost" signed by its own key (the test's only trusted CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_https_verifies_the_server_and_makes_its_tls_context_once(
    aws: tuple[str, type[Aws]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    cert, key = self_signed(tmp_path)
    _, handler = aws
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://localhost:{server.server_address[1]}/latest/meta-data/iam/security-credentials/"
    monkeypatch.setattr(s3get, "_TLS_WRAP", [])
    try:
        with pytest.raises(ssl.SSLCertVerificationError):  # an OSError: unreachable, as any failed connection
            s3get.exchange("GET", url)  # the system's CAs do not know this server
        monkeypatch.setattr(s3get, "_TLS_WRAP", [])
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's default verify paths, as on an AMI
        token = {"x-aws-ec2-metadata-token": "imds-token"}
        assert s3get.exchange("GET", url, token) == (200, b"the-role")
        wrap = s3get._TLS_WRAP[0]
        assert s3get.exchange("GET", url, token) == (200, b"the-role")
        assert len(s3get._TLS_WRAP) == 1 and s3get._TLS_WRAP[0] is wrap  # one context for every connection
    finally:
        server.shutdown()
        server.server_close()
