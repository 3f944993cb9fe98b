"""The contract between the local region daemon and the Linux machinery that makes instances real.

The daemon (``local/daemon.py``) decides *what* should exist from the local AWS API's state; a
:class:`HostMachinery` makes it so on this machine: network namespaces, a bridge for the VPC, NICs,
loop devices, overlay root filesystems, processes. ``LinuxHosts`` (``local/hosts.py``) is the real one;
``FakeHosts`` (``local/fakehosts.py``) records calls in memory for unit tests of the daemon.

Every method is idempotent: calling it again for something that already exists (or is already gone)
is a no-op, so the daemon can reconcile by simply re-applying the desired state.
"""

from __future__ import annotations

import socket
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

# Where an attached EBS volume appears inside an instance: the name udev gives EBS volumes on Nitro
# instances (https://docs.aws.amazon.com/ebs/latest/userguide/nvme-ebs-volumes.html).
EBS_BY_ID_PREFIX = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"

# IMDS lives at this link-local address inside every instance, as on EC2.
IMDS_ADDRESS = IPv4Address("169.254.169.254")


def ebs_by_id_path(volume_id: str) -> str:
    """``vol-0abc`` -> ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc``."""
    return EBS_BY_ID_PREFIX + volume_id.replace("-", "")


@dataclass(frozen=True)
class VpcSpec:
    cidr: IPv4Network
    subnets: tuple[IPv4Network, ...]

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router's own address (base+1); the API for instances listens here."""
        return self.cidr.network_address + 1


@dataclass(frozen=True)
class InstanceSpec:
    instance_id: str
    primary_ip: IPv4Address
    mac: str
    subnet: IPv4Network  # eth0 gets primary_ip/prefix of this subnet, default route via its base+1


@dataclass(frozen=True)
class NicSpec:
    eni_id: str
    mac: str
    device_index: int
    # The ENI's primary private IP: the only IPv4 source address the VPC accepts from this NIC (EC2's
    # source/destination check). None leaves the NIC unchecked (LinuxHosts logs a warning).
    ip: IPv4Address | None = None


@dataclass(frozen=True)
class VolumeSpec:
    volume_id: str
    image: Path  # the sparse file that holds the volume's bytes
    size_gib: int


class HostMachinery(ABC):
    """Makes the local API's instances real Linux hosts. All methods idempotent; errors are HostError."""

    @abstractmethod
    def create_vpc(self, vpc: VpcSpec) -> None:
        """The VPC namespace with its bridge and router addresses (base+1 of the VPC and of every subnet),
        IPv4 forwarding between subnets, the IMDS address, EC2's source/destination check, and a blackhole
        route for the VPC CIDR in the root namespace."""

    @abstractmethod
    def listen_in_vpc(self, address: IPv4Address, port: int) -> socket.socket:
        """A listening TCP socket bound to ``address:port`` inside the VPC namespace, for the daemon to serve
        the AWS API and IMDS to instances."""

    @abstractmethod
    def create_instance(self, spec: InstanceSpec) -> None:
        """Network namespace named by instance id, own mount namespace and overlay root, eth0 on the bridge."""

    @abstractmethod
    def run_user_data(self, instance_id: str, script: bytes, env: Mapping[str, str]) -> None:
        """Run ``script`` inside the instance like cloud-init, output to ``/var/log/cloud-init-output.log``."""

    @abstractmethod
    def destroy_instance(self, instance_id: str) -> None:
        """Power cut: SIGKILL every process of the instance, then remove its namespaces, mounts and root."""

    @abstractmethod
    def plug_nic(self, instance_id: str, nic: NicSpec) -> None:
        """Hot-plug a NIC with the ENI's MAC into the instance (left unconfigured, as on a plain AMI)."""

    @abstractmethod
    def unplug_nic(self, instance_id: str, eni_id: str) -> None: ...

    @abstractmethod
    def attach_volumes(self, instance_id: str, volumes: Sequence[VolumeSpec]) -> None:
        """Loop-attach each volume's image and show it in the instance at :func:`ebs_by_id_path`."""

    def attach_volume(self, instance_id: str, volume: VolumeSpec) -> None:
        self.attach_volumes(instance_id, [volume])

    @abstractmethod
    def detach_volume(self, instance_id: str, volume_id: str) -> None: ...

    @abstractmethod
    def live_instances(self) -> set[str]:
        """Instance ids that currently have a host on this machine."""

    @abstractmethod
    def create_bastion(self, name: str, ip: IPv4Address, subnet: IPv4Network) -> None:
        """A namespace ``name`` on the VPC bridge with ``ip``, default route via the VPC router."""

    @abstractmethod
    def exec_in(
        self, namespace: str, argv: Sequence[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command in a namespace (bastion or instance) and wait for it."""

    @abstractmethod
    def pause(self, instance_id: str) -> None:
        """SIGSTOP every process of the instance."""

    @abstractmethod
    def resume(self, instance_id: str) -> None: ...

    @abstractmethod
    def partition(self, instance_id: str) -> None:
        """Cut the instance off the VPC (all its NICs down on the bridge side)."""

    @abstractmethod
    def heal(self, instance_id: str) -> None: ...

    @abstractmethod
    def teardown(self) -> None:
        """Remove every namespace, link, loop device, mount, process and file the machinery created,
        also after a crash (from the journal and by name)."""
