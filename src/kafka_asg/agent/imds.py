"""IMDSv2 client (plain sockets: :func:`kafka_asg.s3get.exchange`), with cloud-init's ``DataSourceEc2``
behaviour:

- the session token is fetched lazily (``PUT /latest/api/token`` with a TTL header) and reused;
- a 401 means the token went stale: clear it, fetch a new one, retry the request once;
- a 403 on the token PUT means IMDS is disabled for this instance (or ``HttpTokens``/hop limit forbid
  us): fail fast, waiting cannot fix it;
- connection errors, timeouts and 503 (IMDS throttles) are retried with :class:`kafka_asg.retry.Retry`;
- the token is never logged: it is sent only as a header and never put in a message.

https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from functools import partial
from ipaddress import IPv4Address, IPv4Network

from kafka_asg.agent.concurrency import results_at_once
from kafka_asg.agent.ports import Imds, InstanceIdentity
from kafka_asg.agent.reads import Recent
from kafka_asg.errors import CloudError, NotFoundError, Unavailable
from kafka_asg.retry import Retry
from kafka_asg.s3get import exchange

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
META = "/latest/meta-data/"
CREDENTIALS = "iam/security-credentials/"
# 6 h, the maximum: the agent runs for the instance's lifetime and refreshes on 401 anyway.
DEFAULT_TOKEN_TTL = 21600


class _Stale(Exception):
    """HTTP 401: the token expired or was never valid."""


class HttpImds(Imds):
    """IMDSv2 over HTTP.

    :param base_url: ``http://169.254.169.254`` on EC2; the rehearsal serves it at the same address inside
        each instance's namespace, tests on 127.0.0.1 (``KAFKA_ASG_IMDS_URL``).
    :param timeout: per-request socket timeout (IMDS answers in milliseconds when it answers at all).
    :param retry: policy for connection errors and 503.
    :param lifecycle_max_age: seconds the target lifecycle state is reused (0: never). The loop reads it every
        cycle, and a boot runs a dozen cycles back to back; it only changes when the ASG moves the instance
        into or out of a warm pool, which no boot step races.
    :param clock: monotonic seconds, for ``lifecycle_max_age``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token_ttl: int = DEFAULT_TOKEN_TTL,
        timeout: float = 2.0,
        retry: Retry | None = None,
        lifecycle_max_age: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = (base_url or os.environ.get("KAFKA_ASG_IMDS_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.token_ttl = token_ttl
        self.timeout = timeout
        self.retry = retry or Retry(deadline=20.0, delay=0.2, max_delay=2.0)
        self._token: str | None = None
        self._identity: InstanceIdentity | None = None
        self._lifecycle = Recent(clock, lifecycle_max_age)

    # ---------------------------------------------------------------------------- HTTP
    def _open(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        """One HTTP exchange (through no proxy, whatever the environment says, as cloud-init does); statuses
        mapped to the error taxonomy (URLs only in messages, never headers)."""
        url = self.base_url + path
        what = f"{method} {url}"
        try:
            code, data = exchange(method, url, headers, self.timeout)
        except OSError as exc:
            raise Unavailable(f"IMDS at {self.base_url} unreachable for {what}: {exc}") from None
        if code == 200:
            return data
        if code == 401:
            raise _Stale(what)
        if code == 404:
            raise NotFoundError(f"IMDS has no {url} (404)")
        if code == 403:
            raise CloudError(
                f"IMDS refused {what} (403): instance metadata is disabled for this instance or the token "
                "PUT crossed too many hops; enable IMDS (HttpEndpoint=enabled) / raise HttpPutResponseHopLimit",
                "IMDS403",
            )
        if code in (429, 503) or code >= 500:
            raise Unavailable(f"IMDS answered {code} to {what}")
        raise CloudError(f"IMDS answered {code} to {what}", f"IMDS{code}")

    def _fetch_token(self) -> str:
        headers = {TTL_HEADER: str(self.token_ttl)}
        token = self.retry("IMDS token", lambda: self._open("PUT", TOKEN_PATH, headers)).decode().strip()
        if not token:
            raise CloudError("IMDS returned an empty token", "IMDSToken")
        logger.debug("got an IMDSv2 token (ttl %ds)", self.token_ttl)
        return token

    def _get_once(self, path: str) -> str:
        if self._token is None:
            self._token = self._fetch_token()
        headers = {TOKEN_HEADER: self._token}
        return self.retry(f"IMDS {path}", lambda: self._open("GET", path, headers)).decode()

    def get(self, path: str) -> str:
        """GET ``path`` (absolute, e.g. ``/latest/meta-data/instance-id``) with the token.

        :raises NotFoundError: 404 (the item does not exist for this instance).
        :raises Unavailable: IMDS unreachable or throttling past the retry deadline.
        :raises CloudError: 403 and other non-transient answers.
        """
        try:
            return self._get_once(path)
        except _Stale:
            logger.info("IMDS token rejected (401); fetching a new one")
            self._token = None
        try:
            return self._get_once(path)
        except _Stale:
            raise CloudError(f"IMDS rejected a fresh token for {path} (401 twice)", "IMDS401") from None

    def _meta(self, item: str) -> str:
        return self.get(META + item).strip()

    def _optional(self, item: str) -> str | None:
        try:
            return self._meta(item)
        except NotFoundError:
            return None

    # ---------------------------------------------------------------------------- Imds
    def identity(self) -> InstanceIdentity:
        """Fetched once and cached: none of it changes during an instance's life."""
        if self._identity is None:
            mac = self._meta("mac")
            nic = f"network/interfaces/macs/{mac}/"
            items = (
                "instance-id",
                "placement/region",
                "placement/availability-zone",
                "placement/availability-zone-id",
                nic + "subnet-id",
                nic + "subnet-ipv4-cidr-block",
                nic + "vpc-id",
                "local-ipv4",
            )
            # Side by side (a boot waits for them before its claim); the first failure, in this order, is raised.
            got = results_at_once({item: partial(self._meta, item) for item in items})
            self._identity = InstanceIdentity(
                instance_id=got["instance-id"],
                region=got["placement/region"],
                az=got["placement/availability-zone"],
                az_id=got["placement/availability-zone-id"],
                mac=mac,
                subnet_id=got[nic + "subnet-id"],
                subnet_cidr=IPv4Network(got[nic + "subnet-ipv4-cidr-block"]),
                vpc_id=got[nic + "vpc-id"],
                local_ipv4=IPv4Address(got["local-ipv4"]),
            )
        return self._identity

    def target_lifecycle_state(self) -> str | None:
        item = "autoscaling/target-lifecycle-state"
        return self._lifecycle.get(item, lambda: self._optional(item))

    def nic_device_number(self, mac: str) -> int | None:
        value = self._optional(f"network/interfaces/macs/{mac}/device-number")
        return int(value) if value and value.isdigit() else None

    def role_credentials(self) -> Mapping[str, str]:
        """Read afresh on every call: the caller (``agent/aws.py``) keeps them until shortly before they expire."""
        roles = self._meta(CREDENTIALS).split()
        if not roles:
            raise NotFoundError(f"IMDS lists no role under {CREDENTIALS}")
        try:
            doc = json.loads(self._meta(CREDENTIALS + roles[0]))
        except ValueError as exc:
            raise CloudError(f"IMDS's credentials for role {roles[0]} are not JSON: {exc}", "IMDSCredentials") from exc
        return {str(k): str(v) for k, v in doc.items()}
