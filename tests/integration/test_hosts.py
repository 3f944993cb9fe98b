"""LinuxHosts on this machine: real namespaces, veths, bridge, nftables, loop devices, overlays.

Rehearsal addresses (10.0.0.0/26) are used only inside the namespaces these tests create; every probe runs
in a bastion or an instance via ``exec_in``, never from the root namespace. Each test tears the region down
in a fixture and checks the machine is exactly as before.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from kafka_asg.errors import HostError
from kafka_asg.local.hostapi import InstanceSpec, NicSpec, VolumeSpec, VpcSpec, ebs_by_id_path
from kafka_asg.local.hosts import ROUTER_MAC, LinuxHosts
from kafka_asg.paths import RegionPaths
from kafka_asg.retry import wait_until

pytestmark = [
    pytest.mark.rehearsal,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "nsenter", "unshare", "losetup", "nc")),
        reason="needs root, iproute2, nftables, util-linux and netcat",
    ),
]

SUBNET_A = IPv4Network("10.0.0.0/28")
SUBNET_B = IPv4Network("10.0.0.16/28")
VPC = VpcSpec(IPv4Network("10.0.0.0/26"), (SUBNET_A, SUBNET_B, IPv4Network("10.0.0.32/28")))
# Our own VPC and bastion names, so a region someone else runs on this machine is never touched.
VPC_NETNS = "kasg-t4-vpc"
BASTION = "kasg-t4-bastion"
BASTION_IP = IPv4Address("10.0.0.4")


# Every instance id of these tests starts with this, so the machine state below can be narrowed to what
# these tests may have created: other engineers' regions may come and go on this machine meanwhile.
ID_PREFIX = "i-t4"


def machine_state(root: Path) -> dict[str, list[str]]:
    """What the region may change on this machine, as seen from the root namespace: every root link and
    root route except the shared blackhole (checked separately), and every namespace, loop device and
    mount that names our namespaces or lies below our state dir."""

    def out(*argv: str) -> list[str]:
        return sorted(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines())

    def ours(line: str) -> bool:
        return any(mark in line for mark in (str(root), VPC_NETNS, BASTION, ID_PREFIX))

    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout)
    return {
        "netns": [n for n in out("ip", "netns", "list") if ours(n)],
        "links": sorted(f"{link['ifname']} {link.get('operstate')}" for link in links),
        "routes": [r for r in out("ip", "route", "show", "table", "all") if "proto 203" not in r],
        "loops": [line for line in out("losetup", "-a") if ours(line)],
        "mounts": [m for m in Path("/proc/mounts").read_text().splitlines() if ours(m)],
    }


def assert_blackhole_gone_unless_another_region_runs() -> None:
    """The shared blackhole stays while any region's VPC exists (another engineer's may be tearing down
    right now and remove it a moment later)."""

    def settled() -> bool:
        others = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        routes = subprocess.run(["ip", "route", "show", "proto", "203"], capture_output=True, text=True, check=True)
        return "vpc" in others or routes.stdout == ""

    wait_until("the blackhole route to go with the last region", settled, deadline=10)


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(6)


def mac_for(n: int) -> str:
    return f"02:4b:41:53:47:{n:02x}"


@pytest.fixture
def paths(tmp_path: Path) -> RegionPaths:
    return RegionPaths(tmp_path / "region")


@pytest.fixture
def hosts(paths: RegionPaths) -> Iterator[LinuxHosts]:
    before = machine_state(paths.root)
    machinery = LinuxHosts(paths, vpc_netns=VPC_NETNS)
    try:
        machinery.create_vpc(VPC)
        machinery.create_vpc(VPC)  # idempotent
        machinery.create_bastion(BASTION, BASTION_IP, SUBNET_A)
        blackhole = subprocess.run(["ip", "route", "show", "proto", "203"], capture_output=True, text=True, check=True)
        assert f"blackhole {VPC.cidr}" in blackhole.stdout
        yield machinery
    finally:
        machinery.teardown()
    assert machine_state(paths.root) == before
    assert_blackhole_gone_unless_another_region_runs()
    assert not (paths.instances_dir.exists() or paths.netns_dir.exists() or paths.journal_file.exists())


def sh(hosts: LinuxHosts, namespace: str, script: str, timeout: float = 15) -> subprocess.CompletedProcess[bytes]:
    return hosts.exec_in(namespace, ["sh", "-c", script], timeout=timeout)


def instance(hosts: LinuxHosts, ip: str, subnet: IPv4Network, n: int) -> InstanceSpec:
    spec = InstanceSpec(new_id(), IPv4Address(ip), mac_for(n), subnet)
    hosts.create_instance(spec)
    hosts.create_instance(spec)  # idempotent
    return spec


def serve_pong(hosts: LinuxHosts, instance_id: str, address: str, port: int) -> None:
    """A TCP server in the instance, started as user data, answering every connection with ``pong``."""
    script = f"#!/bin/sh\necho started\nwhile true; do echo pong | nc -N -l {address} {port}; done\n"
    hosts.run_user_data(instance_id, script.encode(), {})


def reply(hosts: LinuxHosts, namespace: str, address: str, port: int, source: str = "") -> str:
    opt = f"-s {source}" if source else ""
    return sh(hosts, namespace, f"nc -w 2 {opt} {address} {port} </dev/null").stdout.decode().strip()


def test_two_instances_in_two_subnets_reach_each_other_via_the_router(hosts: LinuxHosts) -> None:
    a = instance(hosts, "10.0.0.5", SUBNET_A, 1)
    b = instance(hosts, "10.0.0.20", SUBNET_B, 2)
    assert hosts.live_instances() >= {a.instance_id, b.instance_id}
    # Nothing can leave the VPC: its router knows only its own subnets (no default route, no uplink), so
    # an instance's packet to any other address dies there. Checked by structure, never by trying.
    routes = json.loads(subprocess.run(["ip", "-n", VPC_NETNS, "-j", "route"], capture_output=True, check=True).stdout)
    assert routes and all(IPv4Network(r["dst"]).subnet_of(VPC.cidr) for r in routes)
    links = json.loads(subprocess.run(["ip", "-n", VPC_NETNS, "-j", "link"], capture_output=True, check=True).stdout)
    assert {link["ifname"] for link in links if "master" not in link} == {"lo", "br0"}

    serve_pong(hosts, b.instance_id, "10.0.0.20", 7000)
    wait_until("pong from B", lambda: reply(hosts, a.instance_id, "10.0.0.20", 7000) == "pong", deadline=10)
    route = sh(hosts, a.instance_id, "ip route get 10.0.0.20").stdout.decode()
    assert "via 10.0.0.1 dev eth0" in route
    # The instance sees its own world: eth0 with its MAC in its /sys, its user data and log in its root.
    assert sh(hosts, b.instance_id, "cat /sys/class/net/eth0/address").stdout.decode().strip() == b.mac
    assert "started" in sh(hosts, b.instance_id, "cat /var/log/cloud-init-output.log").stdout.decode()
    assert sh(hosts, b.instance_id, "hostname && getent hosts ip-10-0-0-20").stdout.decode().split() == [
        "ip-10-0-0-20",
        "10.0.0.20",
        "ip-10-0-0-20",
    ]


def test_the_router_keeps_its_mac_while_ports_come_and_go(hosts: LinuxHosts) -> None:
    """A bridge takes the lowest MAC among its ports unless its own is set; instances would then keep
    sending to a router MAC that left with a removed port until their ARP entries expired."""
    a = instance(hosts, "10.0.0.8", SUBNET_A, 7)

    def router_mac() -> str:
        return str(
            json.loads(
                subprocess.run(
                    ["ip", "-n", VPC_NETNS, "-j", "link", "show", "br0"], capture_output=True, check=True
                ).stdout
            )[0]["address"]
        )

    assert router_mac() == ROUTER_MAC
    low = ["ip", "-n", VPC_NETNS, "link"]
    subprocess.run([*low, "add", "kasgtlow", "address", "00:00:5e:00:00:01", "type", "veth", "peer", "name",
                    "kasgtlow2"], check=True)  # fmt: skip
    try:
        subprocess.run([*low, "set", "kasgtlow", "master", "br0", "up"], check=True)
        assert router_mac() == ROUTER_MAC
    finally:
        subprocess.run([*low, "del", "kasgtlow"], check=True)
    assert router_mac() == ROUTER_MAC
    neighbours = sh(hosts, a.instance_id, "nc -z -w 1 10.0.0.1 9; ip neigh show 10.0.0.1").stdout.decode()
    assert f"lladdr {ROUTER_MAC}" in neighbours


def test_user_data_gets_cloud_init_environment(hosts: LinuxHosts) -> None:
    a = instance(hosts, "10.0.0.6", SUBNET_A, 3)
    script = b'#!/bin/sh\ntouch /etc/kasg-t4-marker\necho "env $AWS_ENDPOINT_URL $HOME $PATH"\n'
    hosts.run_user_data(a.instance_id, script, {"AWS_ENDPOINT_URL": "x"})

    def logged() -> str:
        return sh(hosts, a.instance_id, "cat /var/log/cloud-init-output.log").stdout.decode()

    wait_until("user data output", lambda: "env " in logged(), deadline=10)
    assert "env x /root /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in logged()
    assert sh(hosts, a.instance_id, "cat /var/lib/cloud/instance/user-data.txt").stdout == script
    # The root file system is an overlay: the instance writes its own layer, never this machine's /etc.
    assert sh(hosts, a.instance_id, "test -f /etc/kasg-t4-marker").returncode == 0
    assert not Path("/etc/kasg-t4-marker").exists()


def test_listen_in_vpc_serves_an_instance_at_the_imds_address(hosts: LinuxHosts) -> None:
    a = instance(hosts, "10.0.0.7", SUBNET_A, 4)
    server = hosts.listen_in_vpc(IPv4Address("169.254.169.254"), 80)
    seen: list[str] = []

    def answer() -> None:
        conn, peer = server.accept()
        seen.append(peer[0])
        with conn:
            conn.sendall(b"imds\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert reply(hosts, a.instance_id, "169.254.169.254", 80) == "imds"
        thread.join(5)
        assert seen == ["10.0.0.7"]  # the IMDS server can tell instances apart by source address
    finally:
        server.close()


def test_eni_appears_down_with_its_mac_and_source_check_drops_the_wrong_nic(hosts: LinuxHosts) -> None:
    a = instance(hosts, "10.0.0.5", SUBNET_A, 5)
    eni = NicSpec("eni-0123456789abcdef0", mac_for(0x21), device_index=1, ip=IPv4Address("10.0.0.10"))
    hosts.plug_nic(a.instance_id, eni)
    hosts.plug_nic(a.instance_id, eni)  # idempotent
    link = json.loads(sh(hosts, a.instance_id, "ip -j link show ens6").stdout)[0]
    assert link["address"] == eni.mac
    assert "UP" not in link["flags"]
    assert sh(hosts, a.instance_id, "ip -4 -o addr show dev ens6").stdout == b""

    # Wrong: the ENI's address on eth0. Warm the neighbour caches from the primary address first, so the
    # IPv4 packet itself (not only ARP) reaches the bridge and is dropped there.
    serve_pong(hosts, a.instance_id, "0.0.0.0", 7001)
    wait_until("pong via primary", lambda: reply(hosts, BASTION, "10.0.0.5", 7001) == "pong", deadline=10)
    sh(hosts, BASTION, "(while true; do echo pong | nc -N -l 7002; done) >/dev/null 2>&1 &")
    bastion = str(BASTION_IP)
    wait_until("pong from bastion", lambda: reply(hosts, a.instance_id, bastion, 7002) == "pong", deadline=10)
    before = hosts.srccheck_drops()
    assert sh(hosts, a.instance_id, "ip addr add 10.0.0.10/28 dev eth0").returncode == 0
    assert reply(hosts, a.instance_id, bastion, 7002, source="10.0.0.10") == ""
    # The SYN itself never reached the bastion (it would sit in SYN-RECV, its SYN-ACK unanswerable).
    assert sh(hosts, BASTION, "ss -Htn state syn-recv").stdout == b""
    assert reply(hosts, BASTION, "10.0.0.10", 7001) == ""
    after = hosts.srccheck_drops()
    assert after["srccheck-ip"] > before["srccheck-ip"]
    assert after["srccheck-arp"] > before["srccheck-arp"]

    # Right: the address on the ENI's NIC, with policy routing so replies from it leave through it.
    policy = (
        "ip addr del 10.0.0.10/28 dev eth0 && ip link set ens6 up && ip addr add 10.0.0.10/28 dev ens6 "
        "&& ip rule add from 10.0.0.10 table 100 && ip route add 10.0.0.0/28 dev ens6 src 10.0.0.10 table 100 "
        "&& ip route add default via 10.0.0.1 dev ens6 table 100"
    )
    assert sh(hosts, a.instance_id, policy).returncode == 0
    wait_until("pong via the ENI", lambda: reply(hosts, BASTION, "10.0.0.10", 7001) == "pong", deadline=10)

    hosts.unplug_nic(a.instance_id, eni.eni_id)
    hosts.unplug_nic(a.instance_id, eni.eni_id)  # idempotent
    assert sh(hosts, a.instance_id, "ip link show ens6").returncode != 0


def make_volume(paths: RegionPaths, volume_id: str) -> VolumeSpec:
    paths.volumes_dir.mkdir(parents=True, exist_ok=True)
    image = paths.volumes_dir / f"{volume_id}.img"
    with open(image, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    return VolumeSpec(volume_id, image, 1)


def test_volume_data_moves_from_instance_a_to_b(hosts: LinuxHosts, paths: RegionPaths) -> None:
    a = instance(hosts, "10.0.0.5", SUBNET_A, 6)
    b = instance(hosts, "10.0.0.6", SUBNET_A, 7)
    vol = make_volume(paths, "vol-0aaa1111bbbb2222c")
    dev = ebs_by_id_path(vol.volume_id)
    hosts.attach_volume(a.instance_id, vol)
    hosts.attach_volume(a.instance_id, vol)  # idempotent
    assert sh(hosts, a.instance_id, f"readlink -f {dev}").stdout.decode().strip() == "/dev/nvme1n1"
    write = f"test -b {dev} && mkdir -p /data && mount {dev} /data && echo slot-data > /data/f"
    assert sh(hosts, a.instance_id, write).returncode == 0
    assert b"/data" not in Path("/proc/mounts").read_bytes()  # mounted inside the instance only

    hosts.detach_volume(a.instance_id, vol.volume_id)  # unmounts it, like a forced detach
    hosts.detach_volume(a.instance_id, vol.volume_id)  # idempotent
    assert sh(hosts, a.instance_id, f"test -e {dev} || test -e /dev/nvme1n1").returncode != 0
    hosts.attach_volume(b.instance_id, vol)
    hosts.detach_volume(a.instance_id, vol.volume_id)  # a stale detach from A must not take it from B
    read = f"mkdir -p /data && mount {dev} /data && cat /data/f"
    assert sh(hosts, b.instance_id, read).stdout.decode().strip() == "slot-data"


def test_destroy_instance_is_a_power_cut(hosts: LinuxHosts, paths: RegionPaths) -> None:
    a = instance(hosts, "10.0.0.5", SUBNET_A, 8)
    vol = make_volume(paths, "vol-0ccc3333dddd4444e")
    hosts.attach_volume(a.instance_id, vol)
    assert sh(hosts, a.instance_id, f"mkdir -p /data && mount {ebs_by_id_path(vol.volume_id)} /data").returncode == 0
    hosts.run_user_data(a.instance_id, b"#!/bin/sh\necho pid=$$\nexec sleep 600\n", {})

    def user_data_pid() -> int | None:
        log = sh(hosts, a.instance_id, "cat /var/log/cloud-init-output.log").stdout.decode()
        return int(log.split("pid=")[1].split()[0]) if "pid=" in log else None

    pid = wait_until("user data pid", user_data_pid, deadline=10)
    assert Path(f"/proc/{pid}").exists()
    hosts.destroy_instance(a.instance_id)
    hosts.destroy_instance(a.instance_id)  # idempotent

    def dead() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until("user data process to die", dead, deadline=5)
    assert subprocess.run(["losetup", "-j", str(vol.image)], capture_output=True, check=True).stdout == b""
    assert a.instance_id not in hosts.live_instances()
    assert (
        a.instance_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    )
    assert not paths.instance_dir(a.instance_id).exists()


def test_pause_resume_partition_heal(hosts: LinuxHosts) -> None:
    a = instance(hosts, "10.0.0.5", SUBNET_A, 9)
    serve_pong(hosts, a.instance_id, "10.0.0.5", 7003)
    wait_until("pong", lambda: reply(hosts, BASTION, "10.0.0.5", 7003) == "pong", deadline=10)
    hosts.partition(a.instance_id)
    assert reply(hosts, BASTION, "10.0.0.5", 7003) == ""
    hosts.heal(a.instance_id)
    wait_until("pong after heal", lambda: reply(hosts, BASTION, "10.0.0.5", 7003) == "pong", deadline=10)
    hosts.pause(a.instance_id)
    try:
        assert reply(hosts, BASTION, "10.0.0.5", 7003) == ""
    finally:
        hosts.resume(a.instance_id)
    wait_until("pong after resume", lambda: reply(hosts, BASTION, "10.0.0.5", 7003) == "pong", deadline=10)


@pytest.mark.parametrize("journal_lost", [False, True], ids=["with-journal", "journal-lost"])
def test_teardown_after_a_crash_restores_the_machine(paths: RegionPaths, journal_lost: bool) -> None:
    before = machine_state(paths.root)
    crashed = LinuxHosts(paths, vpc_netns=VPC_NETNS)
    try:
        crashed.create_vpc(VPC)
        crashed.create_bastion(BASTION, BASTION_IP, SUBNET_A)
        a = instance(crashed, "10.0.0.5", SUBNET_A, 10)
        crashed.plug_nic(a.instance_id, NicSpec("eni-0fff", mac_for(0x22), 1, IPv4Address("10.0.0.10")))
        vol = make_volume(paths, "vol-0eee5555ffff6666a")
        crashed.attach_volume(a.instance_id, vol)
        sh(crashed, a.instance_id, f"mkdir -p /data && mount {ebs_by_id_path(vol.volume_id)} /data")
        crashed.run_user_data(a.instance_id, b"#!/bin/sh\nexec sleep 600\n", {})
        assert machine_state(paths.root) != before
        if journal_lost:  # then names, link tags and the state dir's layout must be enough
            paths.journal_file.unlink()
    finally:
        # A new process knows only the state dir: the journal and names must be enough.
        LinuxHosts(paths, vpc_netns=VPC_NETNS).teardown()
    assert machine_state(paths.root) == before
    assert_blackhole_gone_unless_another_region_runs()
    assert not paths.journal_file.exists()


def test_a_failed_build_leaves_nothing_behind_and_can_be_retried(hosts: LinuxHosts, paths: RegionPaths) -> None:
    bad = InstanceSpec(new_id(), IPv4Address("10.0.0.5"), "not-a-mac", SUBNET_A)
    with pytest.raises(
        HostError, match=r"invalid lladdr.*ip -n kasg-t4-vpc link add \w+ type veth .* address not-a-mac"
    ):
        hosts.create_instance(bad)
    assert bad.instance_id not in hosts.live_instances()
    assert not paths.instance_dir(bad.instance_id).exists()
    good = InstanceSpec(bad.instance_id, bad.primary_ip, mac_for(11), SUBNET_A)
    hosts.create_instance(good)
    assert good.instance_id in hosts.live_instances()


def test_errors_name_the_problem(hosts: LinuxHosts) -> None:
    with pytest.raises(HostError, match="no namespace 'i-0nothere'"):
        hosts.exec_in("i-0nothere", ["true"])
    with pytest.raises(HostError, match=r"cannot listen on 10\.0\.0\.9:80 in netns kasg-t4-vpc"):
        hosts.listen_in_vpc(IPv4Address("10.0.0.9"), 80)
    with pytest.raises(HostError, match="no instance i-0nothere"):
        hosts.plug_nic("i-0nothere", NicSpec("eni-0x", mac_for(12), 1, IPv4Address("10.0.0.11")))


def test_detach_under_an_open_file_lingers_until_the_holder_dies(hosts: LinuxHosts, paths: RegionPaths) -> None:
    a = instance(hosts, "10.0.0.5", SUBNET_A, 13)
    b = instance(hosts, "10.0.0.6", SUBNET_A, 14)
    vol = make_volume(paths, "vol-0abcabcabcabcabca")
    dev = ebs_by_id_path(vol.volume_id)
    hosts.attach_volume(a.instance_id, vol)
    assert sh(hosts, a.instance_id, f"mkdir -p /data && mount {dev} /data && echo kept > /data/f").returncode == 0
    hosts.run_user_data(a.instance_id, b"#!/bin/sh\nexec sleep 600 < /data/f\n", {})
    wait_until("the holder", lambda: sh(hosts, a.instance_id, "pgrep -x sleep").returncode == 0, deadline=10)

    hosts.detach_volume(a.instance_id, vol.volume_id)  # forced: unmounted lazily, device gone from /dev
    assert sh(hosts, a.instance_id, f"test -e {dev}").returncode != 0
    with pytest.raises(HostError, match="already on /dev/loop"):
        hosts.attach_volume(b.instance_id, vol)  # still "detaching" while the file is open
    hosts.destroy_instance(a.instance_id)
    hosts.attach_volume(b.instance_id, vol)
    assert sh(hosts, b.instance_id, f"mkdir -p /data && mount {dev} /data && cat /data/f").stdout == b"kept\n"
