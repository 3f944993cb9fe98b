"""Fetch one S3 object with nothing but the Python standard library (embedded in the user data).

The AMI has python3 but not necessarily boto3 or the AWS CLI, so the user data uses this to download the
node agent zipapp. Credentials come from the instance role through IMDSv2, as the SDKs do; requests are
signed with Signature Version 4
(https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html). Path-style URLs, because
bucket names with dots (the seed's ``com.example.event-servers``) break virtual-host TLS names.
``AWS_ENDPOINT_URL`` (the SDKs' standard setting) points it at any S3-compatible endpoint.

Usage: ``python3 s3get.py BUCKET KEY DEST REGION``. This file must stay stdlib-only and self-contained.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

IMDS = os.environ.get("KAFKA_ASG_IMDS_URL", "http://169.254.169.254")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _imds(path: str, token: str) -> str:
    req = urllib.request.Request(IMDS + path, headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(resp.read().decode())


def instance_credentials() -> dict[str, str]:
    """The instance role's temporary credentials (IMDSv2: token PUT first, then GETs with the token)."""
    put = urllib.request.Request(
        IMDS + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    with urllib.request.urlopen(put, timeout=5) as resp:
        token = resp.read().decode()
    role = _imds("/latest/meta-data/iam/security-credentials/", token).split()[0]
    creds: dict[str, str] = json.loads(_imds("/latest/meta-data/iam/security-credentials/" + role, token))
    return creds


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    url: str,
    region: str,
    service: str,
    creds: dict[str, str],
    *,
    now: datetime.datetime,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
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


def signed_get(url: str, region: str, creds: dict[str, str], now: datetime.datetime) -> urllib.request.Request:
    return urllib.request.Request(url, headers=sigv4_headers("GET", url, region, "s3", creds, now=now))


def object_url(bucket: str, key: str, region: str, endpoint: str | None = None) -> str:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    base = endpoint.rstrip("/") if endpoint else f"https://s3.{region}.amazonaws.com"
    return f"{base}/{urllib.parse.quote(bucket)}/{urllib.parse.quote(key, safe='/~')}"


def fetch(bucket: str, key: str, dest: str, region: str, attempts: int = 10) -> None:
    """Download to ``dest`` atomically; retry transient failures (the instance may boot before IAM propagates)."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            request = signed_get(
                object_url(bucket, key, region), region, instance_credentials(), datetime.datetime.now(datetime.UTC)
            )
            tmp = dest + ".part"
            with urllib.request.urlopen(request, timeout=60) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
            return
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):
                reason = f"HTTP {exc.code} (missing object or no permission)"
                raise SystemExit(f"s3get: s3://{bucket}/{key}: {reason}") from None
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(min(2**attempt, 10))
    raise SystemExit(f"s3get: s3://{bucket}/{key}: gave up after {attempts} attempts: {last}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit("usage: s3get.py BUCKET KEY DEST REGION")
    fetch(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
