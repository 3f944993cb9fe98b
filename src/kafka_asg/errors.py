"""The one error taxonomy of kafka-asg.

Every side-effect boundary (boto3, IMDS, the OS, ZooKeeper, Kafka) translates what it sees into one of
these, so callers decide on the *category*, never on a library's exception type:

- ``Unavailable``: transient; the same call may succeed later (throttling, 5xx, connection refused).
  Retried by :mod:`kafka_asg.retry`; a loop treats it as "try again next cycle".
- ``ClaimLost``: we lost a race for a slot resource (``InvalidNetworkInterface.InUse``, ``VolumeInUse``).
  Never retried blindly: the caller looks at the holder and decides.
- ``NotFoundError``: the thing is not there (``*.NotFound``, ``NoSuchKey``). Deletion treats it as done.
- ``IdentityMismatch``: data on a volume belongs to another slot or cluster; the node refuses to start.
- ``ConfigError``: the user's input is wrong; carries *all* problems at once.
- ``CloudError`` / ``HostError`` / ``ServiceError``: the remaining, non-transient failures per boundary.
"""

from __future__ import annotations

from collections.abc import Sequence


class KafkaAsgError(Exception):
    """Base of every error kafka-asg raises on purpose."""


class ConfigError(KafkaAsgError):
    """An invalid cluster config; ``problems`` lists every problem found, each naming key and fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


class Unavailable(KafkaAsgError):
    """A transient failure: the same request may succeed later."""


class NotFoundError(KafkaAsgError):
    """The requested resource or object does not exist."""


class ClaimLost(KafkaAsgError):
    """Another instance holds the slot resource we tried to take."""

    def __init__(self, resource_id: str, holder: str | None, message: str = "") -> None:
        self.resource_id = resource_id
        self.holder = holder
        super().__init__(message or f"{resource_id} is held by {holder or 'another instance'}")


class IdentityMismatch(KafkaAsgError):
    """Data on a slot's volume names another slot or cluster: refuse to start on it."""


class CloudError(KafkaAsgError):
    """A non-transient error from the cloud API (carries the AWS error code when there is one)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        self.code = code
        super().__init__(f"{message} ({code})" if code else message)


class HostError(KafkaAsgError):
    """An operating-system step failed (ip, mount, mkfs, losetup, a namespace)."""


class ServiceError(KafkaAsgError):
    """ZooKeeper or Kafka could not be installed, configured, started or probed."""
