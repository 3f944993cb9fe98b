"""In-memory :class:`HostMachinery` for unit tests of the region daemon: records state, creates nothing.

It keeps the same invariants the real machinery must keep (idempotent calls; a NIC or volume can only be
plugged into an instance that exists), so a daemon bug that would fail on Linux fails here too.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from kafka_asg.errors import HostError
from kafka_asg.local.hostapi import HostMachinery, InstanceSpec, NicSpec, VolumeSpec, VpcSpec


@dataclass
class FakeHost:
    spec: InstanceSpec
    nics: dict[str, NicSpec] = field(default_factory=dict)
    volumes: dict[str, VolumeSpec] = field(default_factory=dict)
    user_data_runs: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    paused: bool = False
    partitioned: bool = False


class FakeHosts(HostMachinery):
    def __init__(self) -> None:
        self.vpc: VpcSpec | None = None
        self.hosts: dict[str, FakeHost] = {}
        self.bastions: dict[str, tuple[IPv4Address, IPv4Network]] = {}
        self.destroyed: list[str] = []
        self.listening: list[tuple[IPv4Address, int]] = []
        self.exec_calls: list[tuple[str, tuple[str, ...]]] = []
        self.attach_batches: list[tuple[str, tuple[str, ...]]] = []  # (instance, volume ids) per attach_volumes
        self.torn_down = False
        self._sockets: list[socket.socket] = []

    def _host(self, instance_id: str) -> FakeHost:
        host = self.hosts.get(instance_id)
        if host is None:
            raise HostError(f"no host for {instance_id}")
        return host

    def create_vpc(self, vpc: VpcSpec) -> None:
        self.vpc = vpc

    def listen_in_vpc(self, address: IPv4Address, port: int) -> socket.socket:
        # Loopback stand-in: the requested address is recorded, never used.
        if self.vpc is None:
            raise HostError("listen_in_vpc before create_vpc")
        self.listening.append((address, port))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self._sockets.append(sock)
        return sock

    def create_instance(self, spec: InstanceSpec) -> None:
        if self.vpc is None:
            raise HostError("create_instance before create_vpc")
        self.hosts.setdefault(spec.instance_id, FakeHost(spec))

    def run_user_data(self, instance_id: str, script: bytes, env: Mapping[str, str]) -> None:
        self._host(instance_id).user_data_runs.append((script, dict(env)))

    def destroy_instance(self, instance_id: str) -> None:
        if self.hosts.pop(instance_id, None) is not None:
            self.destroyed.append(instance_id)

    def plug_nic(self, instance_id: str, nic: NicSpec) -> None:
        self._host(instance_id).nics[nic.eni_id] = nic

    def unplug_nic(self, instance_id: str, eni_id: str) -> None:
        host = self.hosts.get(instance_id)
        if host is not None:
            host.nics.pop(eni_id, None)

    def attach_volumes(self, instance_id: str, volumes: Sequence[VolumeSpec]) -> None:
        for volume in volumes:
            if not volume.image.exists():
                raise HostError(f"no image {volume.image} for {volume.volume_id}")
            for other_id, other in self.hosts.items():
                if other_id != instance_id and volume.volume_id in other.volumes:
                    raise HostError(f"{volume.volume_id} is still attached to {other_id}")
        for volume in volumes:
            self._host(instance_id).volumes[volume.volume_id] = volume
        self.attach_batches.append((instance_id, tuple(v.volume_id for v in volumes)))

    def detach_volume(self, instance_id: str, volume_id: str) -> None:
        host = self.hosts.get(instance_id)
        if host is not None:
            host.volumes.pop(volume_id, None)

    def live_instances(self) -> set[str]:
        return set(self.hosts)

    def create_bastion(self, name: str, ip: IPv4Address, subnet: IPv4Network) -> None:
        self.bastions[name] = (ip, subnet)

    def exec_in(
        self, namespace: str, argv: Sequence[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        self.exec_calls.append((namespace, tuple(argv)))
        return subprocess.CompletedProcess(list(argv), 0, b"", b"")

    def pause(self, instance_id: str) -> None:
        self._host(instance_id).paused = True

    def resume(self, instance_id: str) -> None:
        self._host(instance_id).paused = False

    def partition(self, instance_id: str) -> None:
        self._host(instance_id).partitioned = True

    def heal(self, instance_id: str) -> None:
        self._host(instance_id).partitioned = False

    def teardown(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self.hosts.clear()
        self.bastions.clear()
        self.vpc = None
        self.torn_down = True
