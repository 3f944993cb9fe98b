"""LinuxHost against the real kernel: a throwaway network namespace and a loop device (needs root).

Everything created here is removed in ``finally``: the namespace (with its veth links), mounts, loop devices.
Addresses are TEST-NET-2 (198.51.100.0/24) and exist only inside the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from kafka_asg.agent.linux import LinuxHost, ebs_device_link
from kafka_asg.errors import HostError
from kafka_asg.paths import AgentPaths

pytestmark = [
    pytest.mark.rehearsal,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, loop devices, mount"),
]

SUBNET = IPv4Network("198.51.100.16/28")
PRIMARY_IP = IPv4Address("198.51.100.20")
FIXED_IP = IPv4Address("198.51.100.21")
ENI_MAC = "02:00:5e:00:53:06"
TABLE = 10001


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(run("ip", "-n", ns, "-j", *args) or "[]")
    return data


@pytest.fixture
def netns() -> Iterator[str]:
    """``kasg-t-<random>`` with eth0 (primary, subnet route in main) and ens6 (the ENI's NIC, unconfigured)."""
    name = f"kasg-t-{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        # Two veth pairs inside the namespace; the peers stand in for the VPC side.
        run("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "vpc0")
        run("ip", "-n", name, "link", "add", "ens6", "address", ENI_MAC, "type", "veth", "peer", "name", "vpc1")
        for link in ("lo", "eth0", "vpc0", "vpc1"):
            run("ip", "-n", name, "link", "set", link, "up")
        run("ip", "-n", name, "addr", "add", f"{PRIMARY_IP}/{SUBNET.prefixlen}", "dev", "eth0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)
    assert name not in run("ip", "netns", "list"), f"namespace {name} left behind"


def test_configure_nic_is_idempotent_and_routes_replies_via_the_eni(netns: str, tmp_path: Path) -> None:
    host = LinuxHost(AgentPaths(root=tmp_path), command_prefix=("nsenter", f"--net=/run/netns/{netns}"))

    before = host.nic_by_mac(ENI_MAC.upper())
    assert before is not None
    assert (before.ifname, before.up, before.addresses, before.has_policy_route) == ("ens6", False, (), False)
    assert host.nic_by_mac("02:00:5e:00:53:ff") is None

    for _ in range(2):
        host.configure_nic("ens6", FIXED_IP, SUBNET, TABLE)

    after = host.nic_by_mac(ENI_MAC)
    assert after is not None
    assert (after.ifname, after.up, after.addresses, after.has_policy_route) == ("ens6", True, (FIXED_IP,), True)

    rules = [r for r in ip_json(netns, "rule", "show") if r.get("src") == str(FIXED_IP)]
    assert rules == [{"priority": TABLE, "src": str(FIXED_IP), "table": str(TABLE)}]
    table = {
        (r["dst"], r["dev"], r.get("gateway"), r.get("prefsrc"))
        for r in ip_json(netns, "route", "show", "table", str(TABLE))
    }
    assert table == {("default", "ens6", "198.51.100.17", None), (str(SUBNET), "ens6", None, str(FIXED_IP))}
    # noprefixroute: the main table's subnet route stays on the primary NIC only.
    main = [(r["dst"], r["dev"]) for r in ip_json(netns, "route", "show", "table", "main")]
    assert main == [(str(SUBNET), "eth0")]
    addrs = [a for link in ip_json(netns, "addr", "show", "dev", "ens6") for a in link["addr_info"]]
    assert [(a["local"], a["prefixlen"], a.get("noprefixroute")) for a in addrs if a["family"] == "inet"] == [
        (str(FIXED_IP), SUBNET.prefixlen, True)
    ]

    # Replies from the fixed IP leave by the ENI's NIC; the primary IP keeps using eth0.
    peer = "198.51.100.30"
    assert ip_json(netns, "route", "get", peer, "from", str(FIXED_IP))[0]["dev"] == "ens6"
    assert ip_json(netns, "route", "get", peer)[0]["dev"] == "eth0"


def test_a_found_nic_is_reused_for_a_moment_and_forgotten_on_configure(netns: str, tmp_path: Path) -> None:
    now = [100.0]
    host = LinuxHost(
        AgentPaths(root=tmp_path), command_prefix=("nsenter", f"--net=/run/netns/{netns}"), reads_max_age=0.9,
        clock=lambda: now[0],
    )  # fmt: skip
    first = host.nic_by_mac(ENI_MAC)
    assert first is not None and not first.up
    run("ip", "-n", netns, "link", "set", "ens6", "up")  # changed behind the agent's back
    now[0] += 0.5
    assert host.nic_by_mac(ENI_MAC) == first  # reused: within 0.9 s
    now[0] += 0.5
    seen = host.nic_by_mac(ENI_MAC)
    assert seen is not None and seen.up  # read again
    host.configure_nic("ens6", FIXED_IP, SUBNET, TABLE)
    configured = host.nic_by_mac(ENI_MAC)  # same moment, but configure_nic forgot it
    assert configured is not None and configured.addresses == (FIXED_IP,)


def test_configure_nic_copes_with_a_helper_that_raced_it(netns: str, tmp_path: Path) -> None:
    # amazon-ec2-net-utils added the address and the rule between the agent's reads and its changes: the one-process
    # batch stops at "File exists", and the changes then run one by one, where an existing object counts as done.
    class StaleReads(LinuxHost):
        def _configured(self, ifname: str, ip: IPv4Address) -> tuple[set[IPv4Address], set[str]]:
            return set(), set()

    run("ip", "-n", netns, "addr", "add", f"{FIXED_IP}/{SUBNET.prefixlen}", "dev", "ens6", "noprefixroute")
    run("ip", "-n", netns, "rule", "add", "from", str(FIXED_IP), "lookup", str(TABLE), "priority", str(TABLE))
    host = StaleReads(AgentPaths(root=tmp_path), command_prefix=("nsenter", f"--net=/run/netns/{netns}"))
    host.configure_nic("ens6", FIXED_IP, SUBNET, TABLE)
    after = LinuxHost(AgentPaths(root=tmp_path), command_prefix=("nsenter", f"--net=/run/netns/{netns}")).nic_by_mac(
        ENI_MAC
    )
    assert after is not None and (after.up, after.addresses, after.has_policy_route) == (True, (FIXED_IP,), True)
    assert len([r for r in ip_json(netns, "rule", "show") if r.get("src") == str(FIXED_IP)]) == 1


def test_a_failed_nic_change_names_its_command(netns: str, tmp_path: Path) -> None:
    class NoSuchDevice(LinuxHost):
        def _configured(self, ifname: str, ip: IPv4Address) -> tuple[set[IPv4Address], set[str]]:
            return set(), set()

    host = NoSuchDevice(AgentPaths(root=tmp_path), command_prefix=("nsenter", f"--net=/run/netns/{netns}"))
    with pytest.raises(HostError, match=r"ip addr add 198\.51\.100\.21/28 dev ens9 noprefixroute failed"):
        host.configure_nic("ens9", FIXED_IP, SUBNET, TABLE)


def test_configure_nic_rejects_an_ip_outside_the_subnet(netns: str, tmp_path: Path) -> None:
    host = LinuxHost(AgentPaths(root=tmp_path), command_prefix=("nsenter", f"--net=/run/netns/{netns}"))
    with pytest.raises(HostError, match="not in"):
        host.configure_nic("ens6", IPv4Address("198.51.100.99"), SUBNET, TABLE)


# ------------------------------------------------------------------------------------------------ disks

VOLUME_ID = "vol-0123456789abcdef0"


@pytest.fixture
def ebs_volume(tmp_path: Path) -> Iterator[tuple[AgentPaths, Path]]:
    """A loop device on a sparse file, linked where Nitro's udev rules put an EBS volume, under a temp root."""
    image = tmp_path / "volume.img"
    with open(image, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    loop = Path(run("losetup", "--find", "--show", str(image)).strip())
    root = tmp_path / "root"
    try:
        link = AgentPaths(root=root).under_root(ebs_device_link(VOLUME_ID))
        link.parent.mkdir(parents=True)
        link.symlink_to(loop)
        yield AgentPaths(root=root), loop
    finally:
        # Unmount everything below the temp root (deepest first), then detach the loop device.
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mountpoint in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
            subprocess.run(["umount", mountpoint], check=False, timeout=30)
        subprocess.run(["losetup", "-d", str(loop)], check=False, timeout=30)
    assert not run("losetup", "-j", str(image)).strip(), f"{loop} still holds {image}"
    assert str(root) not in Path("/proc/self/mounts").read_text(), f"mounts left below {root}"


def test_disk_mkfs_only_when_empty_and_identity_survives_a_remount(ebs_volume: tuple[AgentPaths, Path]) -> None:
    paths, loop = ebs_volume
    host = LinuxHost(paths)
    mountpoint = Path("/var/lib/zookeeper/data")

    assert host.disk("vol-0000000000000000f") is None
    empty = host.disk(VOLUME_ID)
    assert empty is not None
    assert (empty.device, empty.filesystem, empty.label, empty.mounted_at) == (loop, None, None, None)

    host.make_filesystem(loop, "kasg-2-zk-data")
    formatted = host.disk(VOLUME_ID)
    assert formatted is not None
    assert (formatted.filesystem, formatted.label) == ("ext4", "kasg-2-zk-data")

    host.mount(loop, mountpoint, "ext4")
    host.mount(loop, mountpoint, "ext4")  # idempotent
    mounted = host.disk(VOLUME_ID)
    assert mounted is not None
    assert (mounted.mounted_at, mounted.filesystem) == (mountpoint, "ext4")  # from the mount table, no blkid
    assert os.path.ismount(paths.under_root(str(mountpoint)))
    host.write_file(mountpoint / "myid", "2\n")
    lost_found = paths.under_root(str(mountpoint / "lost+found"))
    assert lost_found.is_dir()  # mkfs.ext4 leaves it; Kafka would take it for a partition dir
    host.remove_empty_dir(mountpoint / "lost+found")
    host.remove_empty_dir(mountpoint / "lost+found")  # absent: no-op
    host.remove_empty_dir(mountpoint / "myid")  # not a directory: kept
    assert not lost_found.exists()

    with pytest.raises(HostError, match="refusing to format"):
        host.make_filesystem(loop, "kasg-2-zk-data")

    run("umount", str(paths.under_root(str(mountpoint))))
    unmounted = host.disk(VOLUME_ID)
    assert unmounted is not None
    assert unmounted.mounted_at is None
    assert host.read_file(mountpoint / "myid") is None  # the empty mountpoint, not the volume

    with pytest.raises(HostError, match="refusing to format"):
        host.make_filesystem(loop, "other")
    host.mount(loop, mountpoint, "ext4")
    assert host.read_file(mountpoint / "myid") == "2\n"
    remounted = host.disk(VOLUME_ID)
    assert remounted is not None
    assert (remounted.filesystem, remounted.mounted_at) == ("ext4", mountpoint)
    assert unmounted.label == "kasg-2-zk-data"  # the label survived the mount cycle (blkid, unmounted)


def test_a_probe_is_reused_for_a_moment_but_never_to_format(ebs_volume: tuple[AgentPaths, Path]) -> None:
    paths, loop = ebs_volume
    now = [100.0]
    host = LinuxHost(paths, reads_max_age=0.9, clock=lambda: now[0])
    empty = host.disk(VOLUME_ID)
    assert empty is not None and empty.filesystem is None
    # Behind the agent's back; ext2: anything but ext4 is left to blkid, whose probe is reused.
    run("mkfs.ext2", "-q", "-L", "someone-else", str(loop))
    now[0] += 0.5
    reused = host.disk(VOLUME_ID)
    assert reused is not None and reused.filesystem is None  # the probe is reused within 0.9 s...
    other = paths.under_root(ebs_device_link("vol-0000000000000000e"))
    other.symlink_to(loop)  # another volume on the same device node (a detach, then an attach): probed afresh
    seen = host.disk("vol-0000000000000000e")
    assert seen is not None and seen.filesystem == "ext2"
    other.unlink()
    with pytest.raises(HostError, match=r"refusing to format .* ext2 \(label someone-else\)"):
        host.make_filesystem(loop, "kasg-2-zk-data")  # ...but mkfs probes afresh and refuses
    now[0] += 0.1
    fresh = host.disk(VOLUME_ID)
    assert fresh is not None and (fresh.filesystem, fresh.label) == ("ext2", "someone-else")  # forgotten by mkfs
    run("mkfs.ext4", "-q", "-F", "-L", "ext4-now", str(loop))  # behind its back again, within the 0.9 s
    now[0] += 0.1
    at_once = host.disk(VOLUME_ID)  # an ext4 superblock is read at every look, whatever blkid said a moment ago
    assert at_once is not None and (at_once.filesystem, at_once.label) == ("ext4", "ext4-now")
    now[0] += 1.0
    host.mount(loop, Path("/var/lib/zookeeper/data"), "ext4")
    mounted = host.disk(VOLUME_ID)
    assert mounted is not None and mounted.mounted_at == Path("/var/lib/zookeeper/data")


def test_mount_refuses_a_second_place(ebs_volume: tuple[AgentPaths, Path]) -> None:
    paths, loop = ebs_volume
    host = LinuxHost(paths)
    host.make_filesystem(loop, "kasg-1-kafka-log")
    # mount(2) is told the type the probe found: a wrong one is named, never guessed around.
    with pytest.raises(HostError, match=r"\(nosuchfs\) failed: No such device: this kernel has no nosuchfs support"):
        host.mount(loop, Path("/var/lib/kafka/event-log"), "nosuchfs")
    with pytest.raises(HostError, match=r"\(ext2\) failed: Invalid argument: is it really ext2\?"):
        host.mount(loop, Path("/var/lib/kafka/event-log"), "ext2")
    host.mount(loop, Path("/var/lib/kafka/event-log"), "ext4")
    with pytest.raises(HostError, match="already mounted at /var/lib/kafka/event-log"):
        host.mount(loop, Path("/var/lib/zookeeper/data"), "ext4")


def test_files_are_relative_to_the_root(tmp_path: Path) -> None:
    host = LinuxHost(AgentPaths(root=tmp_path))
    assert host.read_file(Path("/etc/kafka-asg/zoo.cfg")) is None
    host.write_file(Path("/etc/kafka-asg/zoo.cfg"), "tickTime=2000\n", mode=0o600)
    target = tmp_path / "etc/kafka-asg/zoo.cfg"
    assert target.read_text() == "tickTime=2000\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert host.read_file(Path("/etc/kafka-asg/zoo.cfg")) == "tickTime=2000\n"
    host.remove_empty_dir(Path("/etc"))  # not empty: kept
    assert target.is_file()
