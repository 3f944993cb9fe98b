"""``RecentReads``: the agent's EC2 reads, reused while it waits on its own servers.

While ZooKeeper joins the quorum and Kafka registers, the loop looks every ``soon_interval`` (0.2 s) or when a
ZooKeeper watch wakes it; the EC2 side (slot ENIs, slot volumes, holders) does not change meanwhile unless the
agent changes it itself, and describing it five times a second was most of the agent's CPU during a boot (and,
on the busy API of a boot, 20-50 ms between ZooKeeper serving and Kafka starting). Reads are reused for at most
``max_age`` seconds (the agent: a serving cycle, 5 s) and only across such waits and the node's own steps
(mount, render, start: the boot runs them back to back), never across a wait on EC2 or another instance, and
forgotten after every step that changes them (the agent's own claim is read back at once, and after attaching
volumes, the volumes). Fencing is unaffected in kind: a lost slot is seen at most ``max_age`` later, as a serving
node sees it at its next cycle.

One read is kept for good: an instance seen ``shutting-down`` or ``terminated`` never runs again (EC2 User Guide,
"Instance state changes"), so the wait for a dying holder's ENI describes only the ENI, twice a second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar, cast

from kafka_asg.agent.ports import Cloud, EniView, InstanceState, VolumeView

T = TypeVar("T")
# The default for how long EC2, IMDS lifecycle, NIC and blkid reads are reused across the node's own waits: at most a
# serving cycle, so a booting node never looks at its slot less often than a serving one (AgentSettings).
READS_MAX_AGE = 5.0
ReadKind = Literal["enis", "volumes", "instance volumes", "state"]
ALL_READS: tuple[ReadKind, ...] = ("enis", "volumes", "instance volumes", "state")
# What attaching a volume makes stale: the volume reads only (the ENIs and instance states are unchanged).
VOLUME_READS: tuple[ReadKind, ...] = ("volumes", "instance volumes")
# No way back from these: shutting-down only ever becomes terminated (unlike stopping/stopped, which can run again).
FINAL_STATES: frozenset[InstanceState] = frozenset({"shutting-down", "terminated"})


def _always(value: object) -> bool:
    return True


class Recent:
    """Reads kept for ``max_age`` seconds by ``clock`` (0: never kept): the agent's one way of reusing a read for
    a moment (EC2 reads here; the NIC and ``blkid`` probes in linux.py; the lifecycle state in imds.py)."""

    def __init__(self, clock: Callable[[], float], max_age: float) -> None:
        self.clock = clock
        self.max_age = max_age
        self._kept: dict[Hashable, tuple[float, object]] = {}
        self._lock = threading.Lock()  # steps run some calls at once (the mounts): forget() must not race them

    def get(self, key: Hashable, fetch: Callable[[], T], *, keep: Callable[[T], bool] = _always) -> T:
        """The value kept under ``key`` if younger than ``max_age``, else ``fetch()`` (kept if ``keep`` says so)."""
        now = self.clock()
        hit = self._kept.get(key)
        if hit is not None and now - hit[0] < self.max_age:
            return cast(T, hit[1])  # stored by this method under this key, from the same fetch
        value = fetch()
        if keep(value):
            with self._lock:
                self._kept[key] = (now, value)
        return value

    def has(self, key: Hashable) -> bool:
        """Whether a read younger than ``max_age`` is kept under ``key``."""
        hit = self._kept.get(key)
        return hit is not None and self.clock() - hit[0] < self.max_age

    def forget(self, stale: Callable[[Hashable], bool] = _always) -> None:
        """Drop the reads whose key is ``stale`` (all by default)."""
        with self._lock:
            for key in [k for k in self._kept if stale(k)]:
                del self._kept[key]


class RecentReads(Cloud):
    """Reads of ``cloud`` reused for ``max_age`` seconds (by ``clock``); writes pass straight through."""

    def __init__(self, cloud: Cloud, clock: Callable[[], float], max_age: float) -> None:
        self.cloud = cloud
        self._recent = Recent(clock, max_age)
        self._gone: dict[str, InstanceState] = {}  # instances seen on their way to terminated: final

    def forget(self, kinds: Iterable[ReadKind] = ALL_READS) -> None:
        """Drop the reads of ``kinds`` (all by default): the next ones go to EC2."""
        stale = set(kinds)
        self._recent.forget(lambda key: isinstance(key, tuple) and key[0] in stale)

    def _read(self, key: tuple[ReadKind, str] | tuple[ReadKind, str, object], fetch: Callable[[], T]) -> T:
        return self._recent.get(key, fetch)

    # reads ---------------------------------------------------------------------------------------------
    def slot_enis(self, cluster: str, subnet_id: str) -> Sequence[EniView]:
        return self._read(("enis", cluster, subnet_id), lambda: self.cloud.slot_enis(cluster, subnet_id))

    def slot_volumes(self, cluster: str, slot: int) -> Sequence[VolumeView]:
        return self._read(("volumes", cluster, slot), lambda: self.cloud.slot_volumes(cluster, slot))

    def instance_volumes(self, instance_id: str) -> Mapping[str, str]:
        return self._read(("instance volumes", instance_id), lambda: self.cloud.instance_volumes(instance_id))

    def instance_state(self, instance_id: str) -> InstanceState | None:
        if instance_id in self._gone:
            return self._gone[instance_id]
        state = self._read(("state", instance_id), lambda: self.cloud.instance_state(instance_id))
        if state in FINAL_STATES:
            self._gone[instance_id] = state
        return state

    # writes and objects: never cached ----------------------------------------------------------------------
    def attach_eni(self, eni_id: str, instance_id: str, device_index: int) -> None:
        self.forget()
        self.cloud.attach_eni(eni_id, instance_id, device_index)

    def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        self.forget(VOLUME_READS)
        self.cloud.attach_volume(volume_id, instance_id, device)

    def set_scale_in_protection(self, asg_name: str, instance_id: str, protected: bool) -> None:
        # An Auto Scaling setting: nothing the EC2 reads show changes.
        self.cloud.set_scale_in_protection(asg_name, instance_id, protected)

    def report(self, instance_id: str, tags: Mapping[str, str]) -> None:
        self.cloud.report(instance_id, tags)

    def get_object(self, bucket: str, key: str) -> bytes:
        return self.cloud.get_object(bucket, key)

    def download(self, bucket: str, key: str, dest: Path) -> str:
        return self.cloud.download(bucket, key, dest)
