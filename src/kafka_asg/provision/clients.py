"""boto3 clients for provisioning, a counter of the calls they make, and the error boundary.

Sessions honour the AWS SDK's standard settings (``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``;
https://docs.aws.amazon.com/sdkref/latest/guide/feature-ss-endpoints.html), so the same code runs on AWS,
an AWS-compatible endpoint and the local region.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from kafka_asg.config import ClusterConfig
from kafka_asg.errors import CloudError, ConfigError, NotFoundError, Unavailable
from kafka_asg.retry import RETRYABLE_AWS_CODES, Retry

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sts import STSClient

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Read-only operations by naming convention of every AWS API; everything else mutates.
READ_PREFIXES = ("Describe", "Get", "List", "Head")

NOT_FOUND_CODES = frozenset(
    {
        "NoSuchEntity",
        "NoSuchBucket",
        "NoSuchKey",
        "404",
        "NotFound",
        "InvalidGroup.NotFound",
        "InvalidNetworkInterfaceID.NotFound",
        "InvalidVolume.NotFound",
        "InvalidLaunchTemplateName.NotFoundException",
        "InvalidLaunchTemplateId.NotFound",
        "InvalidPermission.NotFound",
        "NoSuchPublicAccessBlockConfiguration",
        "ServerSideEncryptionConfigurationNotFoundError",
    }
)

# One policy for every provisioning call: AWS's throttling/5xx codes are retried for up to a minute.
AWS_RETRY = Retry(deadline=60.0, delay=0.5, max_delay=8.0)


@dataclass
class CallCounter:
    """Counts API calls per operation, fed by botocore's ``before-call`` event (after parameter validation,
    so a request botocore rejects is never counted as sent)."""

    calls: Counter[str] = field(default_factory=Counter)

    def record(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def mutating(self) -> dict[str, int]:
        return {op: n for op, n in self.calls.items() if not op.startswith(READ_PREFIXES)}

    def reset(self) -> None:
        self.calls.clear()


@dataclass(frozen=True)
class AwsClients:
    ec2: EC2Client
    autoscaling: AutoScalingClient
    s3: S3Client
    iam: IAMClient
    sts: STSClient
    counter: CallCounter
    region: str


def aws_clients(cfg: ClusterConfig, endpoint_url: str | None = None) -> AwsClients:
    """Clients for the cluster's region. ``endpoint_url`` None: botocore's own resolution (AWS_ENDPOINT_URL)."""
    env_region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if env_region and env_region != cfg.region:
        raise ConfigError(
            [f"region: the config says {cfg.region} but AWS_REGION is {env_region}; unset AWS_REGION or fix region"]
        )
    session = boto3.session.Session(region_name=cfg.region)
    custom_endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    conf = botocore.config.Config(
        retries={"mode": "standard"},
        # Dotted bucket names (the seed's) need path-style on endpoints without wildcard TLS/DNS.
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
    )
    counter = CallCounter()
    kwargs: dict[str, Any] = {"config": conf}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    clients = AwsClients(
        ec2=session.client("ec2", **kwargs),
        autoscaling=session.client("autoscaling", **kwargs),
        s3=session.client("s3", **kwargs),
        iam=session.client("iam", **kwargs),
        sts=session.client("sts", **kwargs),
        counter=counter,
        region=cfg.region,
    )
    for client in (clients.ec2, clients.autoscaling, clients.s3, clients.iam, clients.sts):
        client.meta.events.register("before-call.*.*", counter.record)
    return clients


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate(what: str, exc: Exception) -> Exception:
    """Map a botocore exception to the kafka-asg taxonomy (amazon.aws ``AWSErrorHandler`` style)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", str(exc))
        if code in RETRYABLE_AWS_CODES:
            return Unavailable(f"{what}: {message} ({code})")
        if code in NOT_FOUND_CODES or code.endswith(".NotFound"):
            return NotFoundError(f"{what}: {message} ({code})")
        return CloudError(f"{what}: {message}", code)
    if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionClosedError):
        return Unavailable(f"{what}: cannot reach the AWS endpoint ({exc}); check AWS_ENDPOINT_URL / the network")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return CloudError(f"{what}: no AWS credentials; set AWS_PROFILE or run `kafka-asg local env`")
    return exc


def call(what: str, func: Callable[[], T], retry: Retry = AWS_RETRY) -> T:
    """Run one AWS call through the retry policy, with errors translated."""

    def attempt() -> T:
        try:
            return func()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate(what, exc) from exc

    return retry(what, attempt)


def call_or_none(what: str, func: Callable[[], T], retry: Retry = AWS_RETRY) -> T | None:
    """Like :func:`call`, but NotFound is an answer (None), not an error."""
    try:
        return call(what, func, retry)
    except NotFoundError:
        return None
