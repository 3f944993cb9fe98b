"""The user data's fetcher, and the plain HTTP and SigV4 signing the node agent shares with it (stdlib only).

The AMI has python3 but not necessarily boto3 or the AWS CLI. The user data's service runs this file: it downloads
the node agent zipapp from S3 with the instance role, then runs it in this same interpreter (one Python start and
one set of imports per agent start, not two). Credentials come from the instance role through IMDSv2, as the SDKs
do; requests are signed with Signature Version 4
(https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html). Path-style URLs, because bucket
names with dots (the seed's ``com.example.event-servers``) break virtual-host TLS names. ``AWS_ENDPOINT_URL`` (the
SDKs' standard setting) points it at any S3-compatible endpoint.

HTTP/1.1 is spoken over a socket (:class:`Connection`), not through ``urllib.request`` or ``http.client``: they
import the ``email`` package, 20-30 ms of every agent start before its first request. What the AWS APIs and IMDS
need of HTTP is small: keep-alive, sized or chunked bodies, TLS (https://www.rfc-editor.org/rfc/rfc9112).

Usage: ``python3 -I -S s3get.py BUCKET KEY DEST REGION [ARGS...]``: download s3://BUCKET/KEY to DEST; given ARGS,
run DEST (a zipapp) with them, or the DEST of an earlier start when S3 cannot be reached now. The user data embeds
this file without its docstrings and comments (:func:`kafka_asg.userdata.fetcher_source`); it must stay self-contained.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import io
import json
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping

IMDS = os.environ.get("KAFKA_ASG_IMDS_URL", "http://169.254.169.254")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
MAX_LINE = 65536
CHUNK = 1 << 20


class HttpError(ConnectionError):
    """The answer is not HTTP or broke off: the connection is no longer usable."""


class Response:
    """An answer: ``status``, ``headers`` (lower-case names), and its body through :meth:`read`."""

    def __init__(
        self, stream: io.BufferedReader, status: int, headers: dict[str, str], has_body: bool, http10: bool = False
    ) -> None:
        self.status, self.headers, self._stream = status, headers, stream
        self.chunked = has_body and "chunked" in headers.get("transfer-encoding", "").lower()
        sized = has_body and not self.chunked and "content-length" in headers
        # Bytes of the body still to come: known for a sized body (0 without one), None for chunked or to-the-close.
        self.length: int | None = None if has_body else 0
        if sized:
            if not _decimal(headers["content-length"]):
                raise HttpError(f"bad content-length {headers['content-length'][:40]!r}")
            self.length = int(headers["content-length"])
        tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        # HTTP/1.0 closes unless the answer says keep-alive; 1.1 keeps the connection unless it says close.
        self.will_close = (
            "close" in tokens or (http10 and "keep-alive" not in tokens) or (self.length is None and not self.chunked)
        )
        self._chunk_left: int | None = None  # chunked: bytes left in the current chunk; None: read a size line

    def read(self, amt: int | None = None) -> bytes:
        """Up to ``amt`` bytes of the body (all of it with None); b"" at its end. HttpError if it broke off."""
        if self.chunked:
            return self._read_chunked(amt)
        if self.length is None:  # delimited by the close
            return self._stream.read(amt if amt is not None else -1)
        want = self.length if amt is None else min(amt, self.length)
        data = self._stream.read(want)
        self.length -= len(data)
        if len(data) < want:
            raise HttpError(f"the answer broke off {self.length} bytes short")
        return data

    def _read_chunked(self, amt: int | None) -> bytes:
        out: list[bytes] = []
        while amt is None or amt > 0:
            if self._chunk_left is None:
                line = _line(self._stream)
                size = line.split(b";", 1)[0].strip()
                if not size or not HEX_DIGITS.issuperset(size):
                    raise HttpError(f"bad chunk size line {line[:40]!r}")
                self._chunk_left = int(size, 16)
                if self._chunk_left == 0:  # the last chunk: skip any trailer fields up to the empty line
                    while _line(self._stream).strip():
                        pass
                    self.chunked, self.length = False, 0
                    break
            take = self._chunk_left if amt is None else min(amt, self._chunk_left)
            data = self._stream.read(take)
            if len(data) < take:
                raise HttpError("the chunked answer broke off")
            out.append(data)
            self._chunk_left -= take
            amt = None if amt is None else amt - take
            if self._chunk_left == 0:
                _line(self._stream)  # the CRLF after the chunk's data
                self._chunk_left = None
        return b"".join(out)


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes "²"


def _line(stream: io.BufferedReader) -> bytes:
    """One line, up to its LF; b"" at the end of the stream; HttpError when longer than MAX_LINE."""
    line = stream.readline(MAX_LINE)
    if line and not line.endswith(b"\n") and len(line) >= MAX_LINE:
        raise HttpError(f"a line of the answer is longer than {MAX_LINE} bytes")
    return line


# The one TLS context's wrap_socket, made at the first TLS connection (loading the CA bundle takes milliseconds).
_TLS_WRAP: list[Callable[..., socket.socket]] = []


def _tls_wrap(sock: socket.socket, host: str) -> socket.socket:
    if not _TLS_WRAP:
        import ssl  # here: 15 ms of imports the rehearsal's plain HTTP never needs

        _TLS_WRAP.append(ssl.create_default_context().wrap_socket)
    return _TLS_WRAP[0](sock, server_hostname=host)


class Connection:
    """One keep-alive HTTP/1.1 connection to ``scheme://netloc``, opened at the first request (again after
    :meth:`close`). ``sock`` is None while closed. Socket errors and timeouts are OSError, as is HttpError."""

    def __init__(self, scheme: str, netloc: str, timeout: float) -> None:
        split = urllib.parse.urlsplit("//" + netloc)
        self.scheme, self.netloc, self.timeout = scheme, netloc, timeout
        self.host, self.port = split.hostname or "", split.port or (443 if scheme == "https" else 80)
        self.sock: socket.socket | None = None
        self._stream: io.BufferedReader | None = None

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Response:
        """Send one request; the answer's status and headers (read its body before the next request)."""
        if self.sock is None or self._stream is None:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            if self.scheme == "https":
                try:
                    sock = _tls_wrap(sock, self.host)
                except BaseException:
                    sock.close()
                    raise
            self.sock, self._stream = sock, sock.makefile("rb")
        headers = dict(headers or {})
        lines = [f"{method} {path} HTTP/1.1"]
        if not any(name.lower() == "host" for name in headers):
            lines.append(f"host: {self.netloc}")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if body or method in ("POST", "PUT"):
            lines.append(f"content-length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return self._response(self._stream, method)

    @staticmethod
    def _response(stream: io.BufferedReader, method: str) -> Response:
        while True:  # past any interim (1xx) answers to the final one
            line = _line(stream)
            if not line:  # a keep-alive connection the server had closed (http.client: RemoteDisconnected)
                raise ConnectionResetError("the server closed the connection before answering")
            parts = line.decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not _decimal(parts[1]):
                raise HttpError(f"not an HTTP answer: {line[:60]!r}")
            headers: dict[str, str] = {}
            while (field := _line(stream)).strip():
                name, _, value = field.decode("latin-1").partition(":")
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            if not field:
                raise HttpError("the answer's header broke off")
            status = int(parts[1])
            if not 100 <= status < 200:
                has_body = method != "HEAD" and status not in (204, 304)
                return Response(stream, status, headers, has_body, http10=parts[0] == "HTTP/1.0")

    def close(self) -> None:
        sock, stream, self.sock, self._stream = self.sock, self._stream, None, None
        if stream is not None:
            stream.close()
        if sock is not None:
            sock.close()


def exchange(
    method: str, url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One request on a connection of its own: the status and the whole body."""
    parts = urllib.parse.urlsplit(url)
    conn = Connection(parts.scheme, parts.netloc, timeout)
    try:
        response = conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), b"", headers)
        return response.status, response.read()
    finally:
        conn.close()


def _imds(method: str, path: str, headers: Mapping[str, str]) -> str:
    status, data = exchange(method, IMDS + path, headers)
    if status != 200:
        raise OSError(f"IMDS answered {status} to {method} {path}")
    return data.decode()


def instance_credentials() -> dict[str, str]:
    """The instance role's temporary credentials (IMDSv2: token PUT first, then GETs with the token)."""
    token = {
        "X-aws-ec2-metadata-token": _imds("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    }
    roles = _imds("GET", "/latest/meta-data/iam/security-credentials/", token).split()
    if not roles:
        raise OSError("IMDS lists no instance role yet")
    creds = json.loads(_imds("GET", "/latest/meta-data/iam/security-credentials/" + roles[0], token))
    # Right after boot IMDS may answer with a Code other than Success and no keys (the role still propagating).
    if not isinstance(creds, dict) or not {"AccessKeyId", "SecretAccessKey"} <= creds.keys():
        code = creds.get("Code") if isinstance(creds, dict) else None
        raise OSError(f"IMDS has no credentials for role {roles[0]} yet ({code or 'no keys'})")
    return {str(k): str(v) for k, v in creds.items()}


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    url: str,
    region: str,
    service: str,
    creds: Mapping[str, str],
    *,
    now: datetime.datetime,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``headers`` plus host, x-amz-date, token and SigV4 authorization, all signed; no query string, the path as
    given (URI-encoded once, as S3 wants). The node agent signs its AWS calls with this too."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    signed = {k.lower(): v.strip() for k, v in (headers or {}).items()}
    signed.update({"host": parts.netloc, "x-amz-date": amz_date})
    if service == "s3":
        signed["x-amz-content-sha256"] = payload
    if creds.get("Token"):
        signed["x-amz-security-token"] = creds["Token"]
    names = ";".join(sorted(signed))
    canonical = "\n".join(
        [method, parts.path or "/", "", "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)), names, payload]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds["SecretAccessKey"]).encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds['AccessKeyId']}/{scope}, SignedHeaders={names}, Signature={signature}"
    )
    return signed


def object_url(bucket: str, key: str, region: str, endpoint: str | None = None) -> str:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    base = endpoint.rstrip("/") if endpoint else f"https://s3.{region}.amazonaws.com"
    return f"{base}/{urllib.parse.quote(bucket)}/{urllib.parse.quote(key, safe='/~')}"


def fetch(bucket: str, key: str, dest: str, region: str, attempts: int = 10) -> None:
    """Download to ``dest`` atomically; retry transient failures (the instance may boot before IAM propagates).
    SystemExit when S3 says the object is missing or forbidden, or after ``attempts``."""
    url = object_url(bucket, key, region)
    parts = urllib.parse.urlsplit(url)
    last: Exception | None = None
    for attempt in range(attempts):
        conn = Connection(parts.scheme, parts.netloc, 60.0)
        try:
            now = datetime.datetime.now(datetime.UTC)
            response = conn.request(
                "GET", parts.path, b"", sigv4_headers("GET", url, region, "s3", instance_credentials(), now=now)
            )
            if response.status in (403, 404):
                raise SystemExit(
                    f"s3get: s3://{bucket}/{key}: HTTP {response.status} (missing object or no permission)"
                )
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            tmp = dest + ".part"
            with open(tmp, "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
            os.replace(tmp, dest)
            return
        except (OSError, ValueError) as exc:  # ValueError: IMDS's credentials were not JSON
            last = exc
        finally:
            conn.close()
        if attempt + 1 < attempts:
            time.sleep(min(2**attempt, 10))
    raise SystemExit(f"s3get: s3://{bucket}/{key}: gave up after {attempts} attempts: {last}")


def run_zipapp(path: str, args: list[str]) -> None:
    """Run the zipapp at ``path`` in this interpreter, as ``python3 path ARGS`` would (its SystemExit ends us)."""
    import runpy

    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")


def main(argv: list[str]) -> None:
    if len(argv) < 4:
        raise SystemExit("usage: s3get.py BUCKET KEY DEST REGION [ARGS...]")
    bucket, key, dest, region, args = argv[0], argv[1], argv[2], argv[3], argv[4:]
    try:
        fetch(bucket, key, dest, region, attempts=10 if not (args and os.path.exists(dest)) else 2)
    except SystemExit as exc:
        if not (args and os.path.exists(dest)):
            raise
        # A restart while S3 is out of reach: the agent fetched at an earlier start runs (it waits for S3 itself).
        print(f"{exc}; running the agent fetched earlier ({dest})", file=sys.stderr)
    if args:
        run_zipapp(dest, args)


if __name__ == "__main__":
    main(sys.argv[1:])
