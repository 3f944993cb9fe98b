"""``status.json``: the agent's state, written atomically every cycle and read by ``kafka-asg-agent health``.

Liveness follows Patroni's ``do_GET_liveness``: the file must have been written within ``max_age`` seconds,
otherwise the agent is not running its loop and its last word cannot be trusted. Readiness = state
``serving`` (ZooKeeper leader/follower and the broker registered in ``/brokers/ids``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from kafka_asg.fsutil import atomic_write

logger = logging.getLogger(__name__)

STATUS_VERSION = 1
STATES = ("serving", "booting", "standby", "refused", "stopping")
# Longer than the slowest cycle (5 s serving) plus one bounded retry deadline.
DEFAULT_MAX_AGE = 120.0


@dataclass(frozen=True)
class Status:
    """One line of truth about this node. Times are Unix seconds."""

    state: str  # serving | booting | standby | refused | stopping
    reason: str  # the last decision's sentence
    instance_id: str
    slot: int | None
    zk_mode: str
    broker_registered: bool
    started_at: float  # when this agent process started
    state_since: float  # when ``state`` last changed
    updated_at: float  # when this file was written
    cycle: int

    def to_json(self) -> str:
        return json.dumps({"version": STATUS_VERSION, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Status:
        doc = json.loads(text)
        return cls(
            state=str(doc["state"]),
            reason=str(doc["reason"]),
            instance_id=str(doc["instance_id"]),
            slot=None if doc.get("slot") is None else int(doc["slot"]),
            zk_mode=str(doc.get("zk_mode", "down")),
            broker_registered=bool(doc.get("broker_registered", False)),
            started_at=float(doc["started_at"]),
            state_since=float(doc["state_since"]),
            updated_at=float(doc["updated_at"]),
            cycle=int(doc.get("cycle", 0)),
        )


def write_status(path: Path, status: Status) -> None:
    # Rewritten every cycle (a dozen back to back during a boot) and rebuilt by the next one after a crash: no
    # fsync. read_status treats a file a power loss left empty as no status.
    atomic_write(path, status.to_json(), durable=False)


def read_status(path: Path) -> Status | None:
    """The last status, or None when the agent never wrote one (or it is unreadable)."""
    try:
        return Status.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("status file %s is unreadable (%s)", path, exc)
        return None


@dataclass(frozen=True)
class Health:
    healthy: bool
    line: str


def health(status: Status | None, now: float, max_age: float = DEFAULT_MAX_AGE) -> Health:
    """Healthy only when the agent is serving and its loop ran within ``max_age`` seconds."""
    if status is None:
        return Health(False, "unknown: the agent has not written a status yet")
    age = now - status.updated_at
    if age > max_age:
        return Health(False, f"stale: last status {age:.0f}s ago (> {max_age:.0f}s): {status.state}: {status.reason}")
    return Health(status.state == "serving", f"{status.state}: {status.reason}")
