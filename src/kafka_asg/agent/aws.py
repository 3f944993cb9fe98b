"""The agent's :class:`~kafka_asg.agent.ports.Cloud` on the AWS APIs, with the standard library only.

EC2 and Auto Scaling through their Query APIs (a form-encoded POST, an XML answer:
https://docs.aws.amazon.com/AWSEC2/latest/APIReference/Query-Requests.html), S3 objects by a path-style GET;
every request signed with Signature Version 4 by the signer the user data's fetcher uses
(:func:`kafka_asg.s3get.sigv4_headers`). The agent makes seven kinds of call; botocore, which it used before,
cost every new instance about 0.15 s before its claim (unpacking botocore from the zipapp, importing it, and
building three clients from its models) and most of the zipapp's size.

Every failure is translated here, at the boundary (amazon.aws ``AWSErrorHandler`` style), by :func:`classify`:

- ``InvalidNetworkInterface.InUse`` / ``VolumeInUse`` / ``IncorrectState`` -> :class:`ClaimLost` (the attach
  call is the lock; never retried blindly);
- ``*.NotFound`` / ``NoSuchKey`` / ``NoSuchBucket`` / 404 -> :class:`NotFoundError` naming the object;
- :data:`~kafka_asg.retry.RETRYABLE_AWS_CODES`, 5xx, expired credentials and connection failures ->
  :class:`Unavailable`, retried by :class:`~kafka_asg.retry.Retry` (the one retry policy);
- anything else -> :class:`CloudError` carrying the AWS code.

Credentials come the SDKs' way: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` when set,
else the instance role's from IMDS, renewed before they expire. The endpoint: ``AWS_ENDPOINT_URL_<SERVICE>``,
then ``AWS_ENDPOINT_URL`` (the rehearsal's local API), else AWS's regional one
(https://docs.aws.amazon.com/sdkref/latest/guide/feature-ss-endpoints.html).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol, cast

from kafka_asg.agent.ports import Cloud, EniView, Imds, InstanceState, VolumeView
from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG
from kafka_asg.errors import ClaimLost, CloudError, NotFoundError, Unavailable
from kafka_asg.retry import RETRYABLE_AWS_CODES, Retry
from kafka_asg.s3get import Connection, Response, object_url, sigv4_headers

logger = logging.getLogger(__name__)

CLAIM_LOST_CODES = frozenset({"InvalidNetworkInterface.InUse", "VolumeInUse", "IncorrectState"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
# Temporary credentials that expired between being read and being used: read them again and retry.
EXPIRED_CREDENTIAL_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired"})
# AWS allows 256 characters per tag value; the agent keeps one short of it.
MAX_TAG_VALUE = 255
EC2_VERSION = "2016-11-15"
AUTOSCALING_VERSION = "2011-01-01"
# The SDKs' service-specific endpoint variables (AWS_ENDPOINT_URL_<serviceId, upper snake case>).
ENDPOINT_VARIABLES = {
    "ec2": "AWS_ENDPOINT_URL_EC2",
    "autoscaling": "AWS_ENDPOINT_URL_AUTO_SCALING",
    "s3": "AWS_ENDPOINT_URL_S3",
}
# Role credentials are renewed this long before they expire; IMDS has new ones at least 5 minutes before
# (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/iam-roles-for-amazon-ec2.html#instance-metadata-security-credentials).
CREDENTIAL_REFRESH_MARGIN = 300.0
CHUNK = 1 << 20
USER_AGENT = "kafka-asg-agent"


class CredentialSource(Protocol):
    """What :class:`AwsCloud` signs with: called before each request; told when AWS said they expired."""

    def __call__(self) -> Credentials: ...

    def forget(self) -> None: ...


@dataclass(frozen=True)
class Credentials:
    """A key pair (and session token). Also a :class:`CredentialSource` of itself: fixed, nothing to read again."""

    access_key_id: str
    secret_access_key: str
    token: str | None = None
    expires_at: float | None = None  # epoch seconds; None: they do not expire

    def __call__(self) -> Credentials:
        return self

    def forget(self) -> None:
        pass

    def for_signing(self) -> dict[str, str]:
        creds = {"AccessKeyId": self.access_key_id, "SecretAccessKey": self.secret_access_key}
        if self.token:
            creds["Token"] = self.token
        return creds


class CredentialChain:
    """The environment's credentials, else the instance role's from IMDS (cached until close to expiry).

    :param imds: where the role's credentials come from.
    :param env: the environment (``os.environ``).
    :param clock: epoch seconds, compared with the credentials' ``Expiration``.
    """

    def __init__(
        self, imds: Imds, env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.imds = imds
        self.env = os.environ if env is None else env
        self.clock = clock
        self._cached: Credentials | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Credentials:
        key, secret = self.env.get("AWS_ACCESS_KEY_ID"), self.env.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            return Credentials(key, secret, self.env.get("AWS_SESSION_TOKEN") or None)
        with self._lock:
            cached = self._cached
            if cached and (cached.expires_at is None or cached.expires_at - self.clock() > CREDENTIAL_REFRESH_MARGIN):
                return cached
            try:
                doc = self.imds.role_credentials()
            except NotFoundError as exc:
                # On a fresh instance the role's credentials can appear in IMDS a little after boot: retry, bounded.
                raise Unavailable(
                    f"no AWS credentials yet ({exc}): is the instance profile attached and IMDS reachable?"
                ) from exc
            try:
                expiration = doc.get("Expiration")
                expires_at = (
                    datetime.datetime.fromisoformat(expiration.replace("Z", "+00:00")).timestamp()
                    if expiration
                    else None
                )
                self._cached = Credentials(doc["AccessKeyId"], doc["SecretAccessKey"], doc.get("Token"), expires_at)
            except (KeyError, ValueError) as exc:
                raise CloudError(f"IMDS role credentials are malformed: {exc!r}", "IMDSCredentials") from exc
            return self._cached

    def forget(self) -> None:
        """AWS said the credentials expired: read them again next time."""
        with self._lock:
            self._cached = None


def classify(code: str, message: str, what: str, resource: str | None = None) -> Exception:
    """The taxonomy error for an AWS error ``code`` answered to ``what``."""
    if code in CLAIM_LOST_CODES:
        return ClaimLost(resource or "?", None, f"{what}: {message} ({code})")
    if code.endswith(".NotFound") or code in NOT_FOUND_CODES:
        return NotFoundError(f"{what}: {resource or 'the resource'} does not exist ({code})")
    if code in RETRYABLE_AWS_CODES or code in EXPIRED_CREDENTIAL_CODES:
        return Unavailable(f"{what}: {message} ({code})")
    return CloudError(f"{what}: {message}", code)


def service_endpoint(service: str, region: str, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    configured = env.get(ENDPOINT_VARIABLES[service]) or env.get("AWS_ENDPOINT_URL")
    if configured:
        return configured.rstrip("/")
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://{service}.{region}.{suffix}"


def parse_xml(data: bytes) -> ET.Element:
    """The document's root with XML namespaces dropped from every tag (each API answers in its own)."""
    root = ET.fromstring(data)
    for element in root.iter():
        if element.tag.startswith("{"):
            element.tag = element.tag.split("}", 1)[1]
    return root


def error_of(status: int, data: bytes) -> tuple[str, str]:
    """(code, message) of an error answer: EC2's ``Response/Errors/Error``, Auto Scaling's
    ``ErrorResponse/Error``, S3's ``Error``; the HTTP status when the body says nothing."""
    try:
        root = parse_xml(data)
    except ET.ParseError:
        root = None
    error = None if root is None else (root if root.tag == "Error" else root.find(".//Error"))
    if error is not None and error.findtext("Code"):
        return str(error.findtext("Code")), (error.findtext("Message") or "").strip()
    if status in (429, 503):
        return "Throttling", f"HTTP {status}"
    if status >= 500:
        return "InternalError", f"HTTP {status}"
    return str(status), f"HTTP {status}"


def _tags(item: ET.Element) -> dict[str, str]:
    return {t.findtext("key") or "": t.findtext("value") or "" for t in item.findall("tagSet/item")}


def _members(prefix: str, values: Sequence[str]) -> dict[str, str]:
    return {f"{prefix}.{n}": value for n, value in enumerate(values, 1)}


def _filters(filters: Mapping[str, str]) -> dict[str, str]:
    params = {}
    for n, (name, value) in enumerate(filters.items(), 1):
        params[f"Filter.{n}.Name"] = name
        params[f"Filter.{n}.Value.1"] = value
    return params


class _Connections(threading.local):
    """Keep-alive connections, one per endpoint and thread (the archive downloads run in their own thread)."""

    def __init__(self) -> None:
        self.by_origin: dict[str, Connection] = {}


class AwsCloud(Cloud):
    """EC2, Auto Scaling and S3 for one region.

    :param region: the instance's region (from IMDS).
    :param credentials: the credentials to sign with (:class:`CredentialChain`, or fixed :class:`Credentials`).
    :param endpoint_url: one endpoint for every service (the ``--endpoint-url`` flag); None: see the module.
    :param retry: the policy for transient failures of every call.
    :param timeout: socket timeout per connect and per read.
    """

    def __init__(
        self,
        region: str,
        credentials: CredentialSource,
        endpoint_url: str | None = None,
        *,
        retry: Retry | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.region = region
        self.credentials = credentials
        self.retry = retry or Retry(deadline=30.0)
        self.timeout = timeout
        self.endpoints = {
            s: (endpoint_url or "").rstrip("/") or service_endpoint(s, region) for s in ENDPOINT_VARIABLES
        }
        self._connections = _Connections()

    # ------------------------------------------------------------------------------ HTTP
    def _connection(self, origin: urllib.parse.SplitResult) -> Connection:
        key = f"{origin.scheme}://{origin.netloc}"
        conn = self._connections.by_origin.get(key)
        if conn is None:
            conn = self._connections.by_origin[key] = Connection(origin.scheme, origin.netloc, self.timeout)
        return conn

    def _drop(self, origin: urllib.parse.SplitResult) -> None:
        conn = self._connections.by_origin.pop(f"{origin.scheme}://{origin.netloc}", None)
        if conn is not None:
            conn.close()

    def _send(
        self, what: str, resource: str | None, method: str, service: str, url: str, *, body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:  # fmt: skip
        """One signed exchange; the open 2xx response (the caller reads it), or the taxonomy error."""
        parts = urllib.parse.urlsplit(url)
        creds = self.credentials()
        now = datetime.datetime.now(datetime.UTC)
        signed = sigv4_headers(
            method, url, self.region, service, creds.for_signing(), now=now, body=body, headers=dict(headers or {})
        )
        signed["user-agent"] = USER_AGENT
        path = parts.path or "/"
        for attempt in (1, 2):
            conn = self._connection(parts)
            reused = conn.sock is not None
            try:
                response = conn.request(method, path, body, signed)
                break
            except (ConnectionResetError, BrokenPipeError) as exc:
                self._drop(parts)
                if reused and attempt == 1:
                    continue  # the endpoint closed an idle keep-alive connection: a new one, once
                raise Unavailable(f"{what}: cannot reach {parts.netloc}: {exc}") from exc
            except OSError as exc:
                self._drop(parts)
                raise Unavailable(f"{what}: cannot reach {parts.netloc}: {exc}") from exc
        if 200 <= response.status < 300:
            return response
        try:
            data = response.read()
        except OSError:
            data = b""
            self._drop(parts)  # the rest of the answer would be read as the next one's
        if response.will_close:
            self._drop(parts)
        code, message = error_of(response.status, data)
        if code in EXPIRED_CREDENTIAL_CODES:
            self.credentials.forget()
        raise classify(code, message, what, resource)

    def _read(self, what: str, parts: urllib.parse.SplitResult, response: Response, size: int | None = None) -> bytes:
        try:
            data = response.read(size)
        except OSError as exc:
            self._drop(parts)
            raise Unavailable(f"{what}: the answer broke off: {exc}") from exc
        if response.will_close and (size is None or not data):
            self._drop(parts)  # the server ends the connection with this answer
        return data

    def _query(
        self, service: str, action: str, params: Mapping[str, str], what: str, resource: str | None = None
    ) -> ET.Element:
        version = EC2_VERSION if service == "ec2" else AUTOSCALING_VERSION
        body = urllib.parse.urlencode({"Action": action, "Version": version, **params}).encode()
        url = self.endpoints[service] + "/"
        headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}

        def once() -> ET.Element:
            response = self._send(what, resource, "POST", service, url, body=body, headers=headers)
            data = self._read(what, urllib.parse.urlsplit(url), response)
            try:
                return parse_xml(data)
            except ET.ParseError as exc:
                raise CloudError(f"{what}: the answer is not XML: {exc}", "MalformedResponse") from exc

        return self.retry(what, once)

    def _pages(self, action: str, params: Mapping[str, str], what: str) -> Iterator[ET.Element]:
        token: str | None = None
        while True:
            page = self._query("ec2", action, {**params, **({"NextToken": token} if token else {})}, what)
            yield page
            token = page.findtext("nextToken")
            if not token:
                return

    # ------------------------------------------------------------------------------ ENIs
    def slot_enis(self, cluster: str, subnet_id: str) -> Sequence[EniView]:
        filters = _filters({"tag:Name": f"{cluster}-eni", f"tag:{CLUSTER_TAG}": cluster, "subnet-id": subnet_id})
        enis = []
        for page in self._pages("DescribeNetworkInterfaces", filters, "DescribeNetworkInterfaces"):
            for raw in page.findall("networkInterfaceSet/item"):
                eni_id = raw.findtext("networkInterfaceId") or "?"
                tags = _tags(raw)
                if not tags.get(SLOT_TAG, "").isdigit():
                    logger.warning("%s has no numeric %s tag; ignoring it", eni_id, SLOT_TAG)
                    continue
                attachment = raw.find("attachment")
                status = None if attachment is None else attachment.findtext("status")
                live = status in ("attaching", "attached", "detaching")
                enis.append(
                    EniView(
                        eni_id=eni_id,
                        slot=int(tags[SLOT_TAG]),
                        ip=IPv4Address(raw.findtext("privateIpAddress") or ""),
                        mac=(raw.findtext("macAddress") or "").lower(),
                        subnet_id=raw.findtext("subnetId") or "",
                        status=raw.findtext("status") or "",
                        attached_to=attachment.findtext("instanceId") if live and attachment is not None else None,
                        attachment_status=status,
                    )
                )
        return enis

    def attach_eni(self, eni_id: str, instance_id: str, device_index: int) -> None:
        params = {"NetworkInterfaceId": eni_id, "InstanceId": instance_id, "DeviceIndex": str(device_index)}
        self._query(
            "ec2", "AttachNetworkInterface", params, f"AttachNetworkInterface {eni_id} to {instance_id}", eni_id
        )

    # --------------------------------------------------------------------------- volumes
    def slot_volumes(self, cluster: str, slot: int) -> Sequence[VolumeView]:
        filters = _filters({f"tag:{CLUSTER_TAG}": cluster, f"tag:{SLOT_TAG}": str(slot)})
        volumes = []
        for page in self._pages("DescribeVolumes", filters, "DescribeVolumes"):
            for raw in page.findall("volumeSet/item"):
                live = [
                    a for a in raw.findall("attachmentSet/item") if a.findtext("status") in ("attaching", "attached")
                ]
                volumes.append(
                    VolumeView(
                        volume_id=raw.findtext("volumeId") or "",
                        slot=slot,
                        role=_tags(raw).get(ROLE_TAG, ""),
                        az=raw.findtext("availabilityZone") or "",
                        state=raw.findtext("status") or "",
                        attached_to=live[0].findtext("instanceId") if live else None,
                        device=live[0].findtext("device") if live else None,
                    )
                )
        return volumes

    def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        params = {"VolumeId": volume_id, "InstanceId": instance_id, "Device": device}
        self._query("ec2", "AttachVolume", params, f"AttachVolume {volume_id} to {instance_id}", volume_id)

    # ------------------------------------------------------------------------- instances
    def _instance(self, instance_id: str) -> ET.Element | None:
        what = f"DescribeInstances {instance_id}"
        answer = self._query("ec2", "DescribeInstances", _members("InstanceId", [instance_id]), what, instance_id)
        return answer.find("reservationSet/item/instancesSet/item")

    def instance_volumes(self, instance_id: str) -> Mapping[str, str]:
        found = self._instance(instance_id)
        mappings = [] if found is None else found.findall("blockDeviceMapping/item")
        return {
            m.findtext("deviceName") or "": m.findtext("ebs/volumeId") or ""
            for m in mappings
            if m.find("ebs") is not None
        }

    def instance_state(self, instance_id: str) -> InstanceState | None:
        try:
            found = self._instance(instance_id)
        except NotFoundError:
            return None
        return None if found is None else cast(InstanceState, found.findtext("instanceState/name"))

    def set_scale_in_protection(self, asg_name: str, instance_id: str, protected: bool) -> None:
        params = {
            **_members("InstanceIds.member", [instance_id]),
            "AutoScalingGroupName": asg_name,
            "ProtectedFromScaleIn": "true" if protected else "false",
        }
        what = f"SetInstanceProtection {instance_id} in {asg_name}"
        self._query("autoscaling", "SetInstanceProtection", params, what, asg_name)

    def report(self, instance_id: str, tags: Mapping[str, str]) -> None:
        params = _members("ResourceId", [instance_id])
        for n, (key, value) in enumerate(sorted(tags.items()), 1):
            params[f"Tag.{n}.Key"] = key
            params[f"Tag.{n}.Value"] = value[:MAX_TAG_VALUE]
        self._query("ec2", "CreateTags", params, f"CreateTags on {instance_id}", instance_id)

    # -------------------------------------------------------------------------------- S3
    def _get(self, bucket: str, key: str, begin: Callable[[], Callable[[bytes], None]]) -> None:
        """GET the object; each try calls ``begin`` for a fresh sink and hands it the body chunk by chunk."""
        url = object_url(bucket, key, self.region, self.endpoints["s3"])
        what, resource = f"GetObject s3://{bucket}/{key}", f"s3://{bucket}/{key}"
        parts = urllib.parse.urlsplit(url)

        def once() -> None:
            response = self._send(what, resource, "GET", "s3", url)
            try:
                sink = begin()
                while chunk := self._read(what, parts, response, CHUNK):  # a short body raises
                    sink(chunk)
            except BaseException:
                self._drop(parts)  # the rest of the body is still on the connection
                raise

        self.retry(what, once)

    def get_object(self, bucket: str, key: str) -> bytes:
        chunks: list[bytes] = []

        def begin() -> Callable[[bytes], None]:
            chunks.clear()
            return chunks.append

        self._get(bucket, key, begin)
        return b"".join(chunks)

    def download(self, bucket: str, key: str, dest: Path) -> str:
        """Stream the object to ``dest``, hashing it on the way (the caller checks the sha256 and renames the
        file into place)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with dest.open("wb") as fh:

            def begin() -> Callable[[bytes], None]:
                nonlocal digest
                fh.seek(0)
                fh.truncate()
                digest = hashlib.sha256()

                def write(chunk: bytes) -> None:
                    digest.update(chunk)
                    fh.write(chunk)

                return write

            self._get(bucket, key, begin)
        return digest.hexdigest()
