"""``LinuxHosts``: the local region's instances made real with namespaces, veths, a bridge and loop devices.

Layout (see ``docs`` of issue 3, "Instances" and "Safety and cleanup"):

- the VPC is a network namespace (``kasg-vpc``) with a bridge ``br0`` that carries the router addresses
  (base+1 of the VPC and of every subnet), forwards between subnets, holds 169.254.169.254 for IMDS and
  enforces EC2's source/destination check with nftables (bridge family);
- an instance is a network namespace named by its instance id plus a persistent mount namespace whose
  root is an overlay of this machine (the "AMI") with a per-instance upper dir (the root volume);
- an ENI is a veth whose instance side carries the ENI's MAC; an EBS volume is a loop device shown in
  the instance as ``/dev/nvmeNn1`` and its ``/dev/disk/by-id`` name.

Every OS object is written to the journal *before* it is created, so :meth:`LinuxHosts.teardown` can
remove it after a crash; OS objects also carry tags where the OS allows (link aliases, route protocol).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from kafka_asg.errors import HostError, Unavailable
from kafka_asg.local.hostapi import (
    HostMachinery,
    InstanceSpec,
    NicSpec,
    VolumeSpec,
    VpcSpec,
    ebs_by_id_path,
)
from kafka_asg.paths import RegionPaths
from kafka_asg.retry import wait_until

logger = logging.getLogger(__name__)

VPC_NETNS = "kasg-vpc"
BRIDGE = "br0"
# The VPC router's MAC, set once: a Linux bridge without a set address takes the lowest MAC among its ports,
# so every plugged or removed instance port could change it, and instances kept sending to the old one
# until their ARP entries expired (tens of seconds of "IMDS timed out" / "no answer"). A VPC router's MAC
# never changes. Locally administered, unicast, and unlike the 02:... of instance MACs.
ROUTER_MAC = "0e:00:00:00:00:01"
NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` pins namespaces (ip-netns(8))
# Routing protocol number that tags our root-namespace blackhole route, so teardown finds it without the
# journal (rtnetlink(7): rtm_protocol values above RTPROT_STATIC are free for user daemons).
ROUTE_PROTO = "203"
NFT_TABLE = "kasg"
# What cloud-init gives user-data scripts on AL2023 (a systemd unit's default PATH), plus the locale.
USER_DATA_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
USER_DATA_FILE = "/var/lib/cloud/instance/user-data.txt"
CLOUD_INIT_LOG = "/var/log/cloud-init-output.log"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
KILL_DEADLINE = 10.0


# --- pure helpers ------------------------------------------------------------------------------------


def port_name(owner: str) -> str:
    """The VPC-side veth of ``owner`` (instance id, ENI id or bastion name): IFNAMSIZ allows 15 chars."""
    return "v" + hashlib.sha1(owner.encode()).hexdigest()[:8]


def eni_ifname(device_index: int) -> str:
    """AL2023 (Nitro, predictable names) shows device index 1 as ``ens6``; nothing may assume ``eth1``."""
    return f"ens{5 + device_index}"


def ec2_hostname(ip: IPv4Address) -> str:
    """EC2's IP-based host name (``ip-10-0-0-5``), which resolves to the primary IP
    (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ec2-instance-naming.html)."""
    return "ip-" + str(ip).replace(".", "-")


def router_addresses(vpc: VpcSpec) -> list[str]:
    """The VPC router's interface addresses: base+1 of the VPC CIDR and of every subnet, with prefixes.
    AWS reserves base+1 of every subnet for the router
    (https://docs.aws.amazon.com/vpc/latest/userguide/subnet-sizing.html)."""
    addrs = [f"{vpc.gateway}/{vpc.cidr.prefixlen}"]
    addrs += [f"{s.network_address + 1}/{s.prefixlen}" for s in vpc.subnets]
    return list(dict.fromkeys(addrs))


def nft_ruleset() -> str:
    """EC2's source/destination check as a bridge-family table: a frame entering the bridge from a NIC's
    port must carry that NIC's address as IPv4 (or ARP sender) source
    (https://docs.aws.amazon.com/vpc/latest/userguide/VPC_NAT_Instance.html#EIP_Disable_SrcDestCheck).
    AWS answers ARP itself from its IP->NIC map; here real ARP runs, so a NIC may only announce its own IP,
    which keeps every neighbour cache as right as AWS's map (no "ARP flux" via the wrong NIC)."""
    return f"""table bridge {NFT_TABLE} {{
    set checked {{ type ifname; }}
    set nic_ip {{ type ifname . ipv4_addr; }}
    chain prerouting {{
        type filter hook prerouting priority -200; policy accept;
        iifname @checked ether type ip iifname . ip saddr != @nic_ip counter drop comment "srccheck-ip"
        iifname @checked ether type arp arp saddr ip != 0.0.0.0 iifname . arp saddr ip != @nic_ip \
counter drop comment "srccheck-arp"
    }}
}}
"""


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """``/proc/PID/mountinfo`` -> ``[(major:minor, mount point)]`` with octal escapes decoded."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        rows.append((fields[2], point))
    return rows


@dataclass(frozen=True)
class _Cmd:
    """A finished command, for error messages."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _run(
    argv: Sequence[str],
    *,
    input_: bytes | None = None,
    check: bool = True,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> _Cmd:
    try:
        proc = subprocess.run(
            list(argv), input=input_, capture_output=True, timeout=timeout, check=False, env=env and dict(env)
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"{' '.join(argv)}: {exc}") from exc
    cmd = _Cmd(tuple(argv), proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed (exit {proc.returncode}): {cmd.stderr.strip() or cmd.stdout.strip()}")
    return cmd


def _ns_inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pids_in_namespaces(net: set[tuple[int, int]], mnt: set[tuple[int, int]]) -> list[int]:
    """Processes whose network namespace is in ``net`` or mount namespace in ``mnt`` (what `ip netns pids`
    does for one namespace). Zombies have no namespaces any more and are not listed."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for kind, wanted in (("net", net), ("mnt", mnt)):
            if wanted and _ns_inode(Path(f"/proc/{entry}/ns/{kind}")) in wanted:
                found.append(int(entry))
                break
    return found


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this (the root) mount namespace, deepest first."""
    prefix = str(root).rstrip("/")
    points = [p for _, p in parse_mountinfo(Path("/proc/self/mountinfo").read_text())]
    mine = {p for p in points if p == prefix or p.startswith(prefix + "/")}
    return sorted(mine, key=lambda p: p.count("/"), reverse=True)


# --- the machinery ------------------------------------------------------------------------------------


class LinuxHosts(HostMachinery):
    """The real :class:`HostMachinery`. Needs root, iproute2, nftables, util-linux.

    :param paths: the region's files; instance roots, namespace pins and the journal live below it.
    :param vpc_netns: name of the VPC namespace (tests use their own so they never meet a running region).
    """

    def __init__(self, paths: RegionPaths, vpc_netns: str = VPC_NETNS) -> None:
        self.paths = paths
        self.vpc_netns = vpc_netns
        self._lock = threading.RLock()
        # The journal as far as read: (device, inode) of the file, bytes read, the entries in them.
        self._journal_read: tuple[tuple[int, int], int, list[dict[str, str]]] = ((0, 0), 0, [])

    # journal ---------------------------------------------------------------------------------------

    def _record(self, **entry: str) -> None:
        """Append one object to the journal and fsync it *before* the object is created."""
        path = self.paths.journal_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _journal(self) -> list[dict[str, str]]:
        """Every entry, in order. The file only ever grows (until teardown removes it): what was read stays
        parsed, and only new lines are read (the daemon asks at every reconcile, and a long-lived region's
        journal took 20 ms to parse)."""
        try:
            with open(self.paths.journal_file, "rb") as fh:
                stat = os.fstat(fh.fileno())
                inode, offset, entries = self._journal_read
                if inode != (stat.st_dev, stat.st_ino) or stat.st_size < offset:
                    inode, offset, entries = (stat.st_dev, stat.st_ino), 0, []
                fh.seek(offset)
                new = fh.read()
        except FileNotFoundError:
            self._journal_read = ((0, 0), 0, [])
            return []
        complete = new[: new.rfind(b"\n") + 1]  # a line still being written is read next time
        entries = list(entries)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("journal %s: skipping torn line %r", self.paths.journal_file, line)
        self._journal_read = (inode, offset + len(complete), entries)
        return list(entries)

    def _journaled(self, kind: str) -> list[dict[str, str]]:
        return [e for e in self._journal() if e.get("kind") == kind]

    # small OS helpers ------------------------------------------------------------------------------

    @staticmethod
    def _netns_list() -> set[str]:
        """What ``ip netns list`` prints: the names pinned under /run/netns (ip-netns(8)), read directly. The
        region asks several times per reconcile cycle, and each ``ip`` process cost 5-20 ms of a boot's plug."""
        try:
            return {entry.name for entry in os.scandir(NETNS_RUN_DIR)}
        except FileNotFoundError:
            return set()

    def _ip(self, netns: str | None, *args: str, check: bool = True) -> _Cmd:
        return _run(["ip", *(("-n", netns) if netns else ()), *args], check=check)

    def _links(self, netns: str) -> list[dict[str, Any]]:
        out = self._ip(netns, "-j", "link", "show").stdout.strip()
        links: list[dict[str, Any]] = json.loads(out or "[]")
        return links

    def _ensure_netns(self, name: str) -> None:
        if name in self._netns_list():
            return
        self._record(kind="netns", name=name)
        _run(["ip", "netns", "add", name])

    def _nft(self, script: str, check: bool = True) -> _Cmd:
        return _run(["ip", "netns", "exec", self.vpc_netns, "nft", "-f", "-"], input_=script.encode(), check=check)

    def _add_port(
        self,
        owner: str,
        alias: str,
        peer_netns: str,
        peer_name: str,
        *,
        mac: str,
        ip: IPv4Address | None,
        vpc_links: list[dict[str, Any]] | None = None,
    ) -> str:
        """A veth pair: ``port_name(owner)`` on the bridge (tagged with ``alias``), the peer created right in
        ``peer_netns`` as ``peer_name`` with ``mac``; the port is checked for ``ip`` as source. ``vpc_links``:
        the VPC namespace's links, if the caller has just listed them."""
        port = port_name(owner)
        self._record(kind="link", netns=self.vpc_netns, name=port)
        links = self._links(self.vpc_netns) if vpc_links is None else vpc_links
        # A failed try's port goes first (deleting either end deletes the pair); then the pair, its peer named
        # and addressed in its namespace from the start: one `ip` process instead of four (a boot's plug waits).
        changes = [f"link del {port}"] if any(link["ifname"] == port for link in links) else []
        changes.append(f"link add {port} type veth peer name {peer_name} address {mac} netns {peer_netns}")
        self._ip_batch(self.vpc_netns, changes)
        if ip is None:
            logger.warning("%s: no IP given; the source/destination check is off for this NIC", owner)
        else:
            self._nft(
                f'add element bridge {NFT_TABLE} nic_ip {{ "{port}" . {ip} }}\n'
                f'add element bridge {NFT_TABLE} checked {{ "{port}" }}\n'
            )
        # Last: the alias marks the port as finished and owned; only then does it join the bridge.
        self._ip(self.vpc_netns, "link", "set", port, "alias", alias, "master", BRIDGE, "up")
        return port

    def _ip_batch(self, netns: str, changes: Sequence[str]) -> _Cmd:
        """Several ``ip`` commands in one process (``ip -batch``: stops at the first that fails, which the error
        names with its line number)."""
        done = _run(["ip", "-n", netns, "-batch", "-"], input_="".join(f"{c}\n" for c in changes).encode(), check=False)
        if done.returncode != 0:
            listing = "; ".join(f"{n}: ip -n {netns} {c}" for n, c in enumerate(changes, 1))
            why = "; ".join(done.stderr.strip().splitlines())
            raise HostError(f"ip -batch failed (exit {done.returncode}): {why} [{listing}]")
        return done

    def _del_port(self, port: str) -> None:
        # The set elements stay: they allow nothing by themselves, and a reused name gets the same IP.
        self._ip(self.vpc_netns, "link", "del", port, check=False)

    def _port_owner(self, port: str, vpc_links: list[dict[str, Any]]) -> str | None:
        """The owner tagged on a VPC-side port ("" for a port whose build did not finish), None if absent."""
        for link in vpc_links:
            if link["ifname"] == port:
                return str(link.get("ifalias", "")).split(" ")[0]
        return None

    def _ports_of(self, owner: str) -> list[str]:
        """VPC-side ports tagged (link alias) as belonging to ``owner``."""
        if self.vpc_netns not in self._netns_list():
            return []
        return [
            str(link["ifname"])
            for link in self._links(self.vpc_netns)
            if str(link.get("ifalias", "")).split(" ")[0] == owner
        ]

    # VPC --------------------------------------------------------------------------------------------

    def create_vpc(self, vpc: VpcSpec) -> None:
        # Root namespace: a blackhole for the rehearsal CIDR, so nothing here can ever reach it by accident.
        self._record(kind="route", dst=str(vpc.cidr))
        _run(["ip", "route", "replace", "blackhole", str(vpc.cidr), "proto", ROUTE_PROTO])
        ns = self.vpc_netns
        self._ensure_netns(ns)
        if not any(link["ifname"] == BRIDGE for link in self._links(ns)):
            self._ip(ns, "link", "add", BRIDGE, "type", "bridge")
        self._ip(ns, "link", "set", BRIDGE, "address", ROUTER_MAC)
        self._ip(ns, "link", "set", "lo", "up")
        self._ip(ns, "link", "set", BRIDGE, "up")
        for addr in router_addresses(vpc):
            self._ip(ns, "addr", "replace", addr, "dev", BRIDGE)
        self._ip(ns, "addr", "replace", "169.254.169.254/32", "dev", "lo")
        # The VPC router forwards between subnets and, unlike a Linux router on one bridge, never sends
        # ICMP redirects (the subnets share br0, so Linux would).
        _run(
            [
                "ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
                f"net.ipv4.conf.{BRIDGE}.send_redirects=0",
            ]
        )  # fmt: skip
        listed = _run(["ip", "netns", "exec", ns, "nft", "list", "table", "bridge", NFT_TABLE], check=False)
        if listed.returncode != 0:
            self._nft(nft_ruleset())
        logger.info("VPC %s ready in netns %s (routers %s)", vpc.cidr, ns, ", ".join(router_addresses(vpc)))

    def srccheck_drops(self) -> dict[str, int]:
        """Packets dropped so far by the source/destination check: ``{"srccheck-ip": n, "srccheck-arp": n}``."""
        out = _run(["ip", "netns", "exec", self.vpc_netns, "nft", "-j", "list", "table", "bridge", NFT_TABLE])
        drops: dict[str, int] = {}
        for item in json.loads(out.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    drops[str(rule["comment"])] = int(expr["counter"]["packets"])
        return drops

    def listen_in_vpc(self, address: IPv4Address, port: int) -> socket.socket:
        netns_file = NETNS_RUN_DIR / self.vpc_netns
        result: dict[str, Any] = {}

        def bind_in_netns() -> None:
            # setns(2) switches only this thread; a socket keeps the namespace it was created in, so the
            # thread may end and the daemon's threads serve from the root namespace.
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(fd)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((str(address), port))
                    sock.listen(128)
                except BaseException:
                    sock.close()
                    raise
                result["sock"] = sock
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=bind_in_netns, name=f"setns-{self.vpc_netns}")
        thread.start()
        thread.join()
        if "error" in result:
            raise HostError(
                f"cannot listen on {address}:{port} in netns {self.vpc_netns}: {result['error']} "
                "(create_vpc first; the address must be a router or IMDS address)"
            ) from result["error"]
        sock: socket.socket = result["sock"]
        return sock

    # instances ---------------------------------------------------------------------------------------

    def _mntns_file(self, instance_id: str) -> Path:
        return self.paths.netns_dir / f"{instance_id}.mnt"

    def _utsns_file(self, instance_id: str) -> Path:
        return self.paths.netns_dir / f"{instance_id}.uts"

    def _root(self, instance_id: str) -> Path:
        return self.paths.instance_dir(instance_id) / "root"

    def _ready_marker(self, instance_id: str) -> Path:
        return self.paths.instance_dir(instance_id) / "ready"

    def _is_instance(self, name: str) -> bool:
        return self._ready_marker(name).exists() and name in self._netns_list()

    def _ensure_ns_dir(self) -> None:
        """unshare(1) can pin a mount namespace only on a mount with private propagation."""
        ns_dir = self.paths.netns_dir
        ns_dir.mkdir(parents=True, exist_ok=True)
        if str(ns_dir) in _mounts_under(ns_dir):
            return
        self._record(kind="mount", path=str(ns_dir))
        _run(["mount", "--bind", str(ns_dir), str(ns_dir)])
        _run(["mount", "--make-private", str(ns_dir)])

    def _enter(self, instance_id: str, chroot: bool = True) -> list[str]:
        """argv prefix that runs a command inside the instance (its netns, mount ns and root)."""
        prefix = [
            "nsenter",
            f"--net={NETNS_RUN_DIR / instance_id}",
            f"--mount={self._mntns_file(instance_id)}",
            f"--uts={self._utsns_file(instance_id)}",
            "--",
        ]
        return [*prefix, "chroot", str(self._root(instance_id))] if chroot else prefix

    def _sh_in(self, instance_id: str, script: str, *args: str, input_: bytes | None = None) -> _Cmd:
        return _run([*self._enter(instance_id), "/bin/sh", "-c", script, "sh", *args], input_=input_)

    def create_instance(self, spec: InstanceSpec) -> None:
        iid = spec.instance_id
        with self._lock:
            if self._is_instance(iid):
                return
            if self.paths.instance_dir(iid).exists() or iid in self._netns_list():
                logger.warning("%s: removing a half-built host before building it again", iid)
                self.destroy_instance(iid)
            self._record(kind="instance", id=iid)
            try:
                self._build_instance(spec)
            except BaseException:
                self.destroy_instance(iid)
                raise
        logger.info("instance %s is up (%s, %s)", iid, spec.primary_ip, spec.mac)

    def _build_instance(self, spec: InstanceSpec) -> None:
        iid = spec.instance_id
        idir = self.paths.instance_dir(iid)
        if any(c in str(idir) for c in ",:"):
            raise HostError(f"{idir}: overlayfs options cannot name a path with ',' or ':'; choose another state dir")
        self._ensure_netns(iid)
        gateway = spec.subnet.network_address + 1
        self._add_port(iid, f"{iid} eth0", iid, "eth0", mac=spec.mac, ip=spec.primary_ip)
        self._ip(iid, "link", "set", "lo", "up")
        self._ip(iid, "addr", "replace", f"{spec.primary_ip}/{spec.subnet.prefixlen}", "dev", "eth0")
        self._ip(iid, "link", "set", "eth0", "up")
        self._ip(iid, "route", "replace", "default", "via", str(gateway), "dev", "eth0")

        self._ensure_ns_dir()
        root, upper, work = idir / "root", idir / "upper", idir / "work"
        self._record(kind="dir", path=str(idir))
        for d in (root, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        mntns, utsns = self._mntns_file(iid), self._utsns_file(iid)
        self._record(kind="mntns", path=str(mntns))
        self._record(kind="utsns", path=str(utsns))
        mntns.touch()
        utsns.touch()
        # Slave propagation: unmounts in the root namespace (e.g. `ip netns del`) reach the instance, its
        # own mounts never leak out. Its own UTS namespace carries the EC2-style host name.
        _run(["unshare", f"--mount={mntns}", f"--uts={utsns}", "--propagation", "slave", "true"])
        # sysfs must be mounted from inside the instance's netns so /sys/class/net lists its NICs.
        hostname = ec2_hostname(spec.primary_ip)
        setup = [str(root), str(upper), str(work), hostname, str(spec.primary_ip), str(self.paths.netns_dir)]
        _run([*self._enter(iid, chroot=False), "/bin/sh", "-c", _ROOT_SETUP, "sh", *setup])
        self._ready_marker(iid).touch()

    def run_user_data(self, instance_id: str, script: bytes, env: Mapping[str, str]) -> None:
        if not self._is_instance(instance_id):
            raise HostError(f"run_user_data: no instance {instance_id} on this machine (create_instance first)")
        self._sh_in(
            instance_id,
            'mkdir -p "$(dirname "$1")" "$(dirname "$2")" && cat > "$1" && chmod 700 "$1" && touch "$2"',
            USER_DATA_FILE,
            CLOUD_INIT_LOG,
            input_=script,
        )
        # cloud-init runs a "#!" part as an executable; anything else we hand to sh.
        run = 'exec "$1"' if script.startswith(b"#!") else 'exec /bin/sh "$1"'
        # setsid -f: the script's session leader is reparented away from the daemon, like a service.
        argv = ["setsid", "-f", *self._enter(instance_id), "/bin/sh", "-c", f'{run} >> "$2" 2>&1 < /dev/null']
        _run([*argv, "sh", USER_DATA_FILE, CLOUD_INIT_LOG], input_=b"", env={**USER_DATA_ENV, **env})
        logger.info("instance %s: user data started", instance_id)

    def _processes(self, instance_id: str) -> list[int]:
        net = {i for i in [_ns_inode(NETNS_RUN_DIR / instance_id)] if i}
        mnt = {i for i in [_ns_inode(self._mntns_file(instance_id))] if i and self._is_pinned(instance_id)}
        if not net and not mnt:
            return []
        return _pids_in_namespaces(net, mnt)

    def _is_pinned(self, instance_id: str) -> bool:
        return str(self._mntns_file(instance_id)) in _mounts_under(self.paths.netns_dir)

    def _signal_all(self, pids: Iterable[int], sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _kill_all(self, what: str, list_pids: Callable[[], list[int]]) -> None:
        """SIGKILL until nothing is left (a process may fork while we kill)."""

        def gone() -> bool:
            pids = list_pids()
            self._signal_all(pids, signal.SIGKILL)
            return not pids

        try:
            wait_until(f"processes of {what} to die", gone, deadline=KILL_DEADLINE, interval=0.05)
        except Unavailable as exc:
            raise HostError(f"{exc}: still running: {list_pids()}") from exc

    def _loops_in_instance(self, instance_id: str) -> list[str]:
        """Loop devices behind the instance's ``/dev/nvme*n1`` nodes, and those the journal last attached
        here (a half-built instance may have no /dev to look at)."""
        loops: set[str] = set()
        if self._is_pinned(instance_id):
            script = 'for d in /dev/nvme*n1; do [ -b "$d" ] && stat -c \'%t:%T\' "$d"; done; true'
            out = _run([*self._enter(instance_id), "/bin/sh", "-c", script], check=False).stdout
            wanted = {tuple(int(x, 16) for x in line.split(":")) for line in out.split()}
            loops |= {dev for dev in self._all_loops() if _rdev(dev) in wanted}
        last: dict[str, dict[str, str]] = {e["volume_id"]: e for e in self._journaled("loop")}
        for entry in last.values():
            if entry.get("instance") == instance_id:
                loops |= set(self._loops_for(Path(entry["image"])))
        return sorted(loops)

    @staticmethod
    def _loop_table() -> dict[str, str]:
        """Attached loop devices: name -> backing file, as ``losetup --list`` shows them (it reads the same sysfs
        files: https://docs.kernel.org/admin-guide/abi-stable.html, /sys/block/loopX/loop/backing_file)."""
        table = {}
        for entry in Path("/sys/block").glob("loop*"):
            try:
                backing = (entry / "loop" / "backing_file").read_text().rstrip("\n")
            except OSError:  # no such file: a loop device with nothing attached
                continue
            table[f"/dev/{entry.name}"] = backing
        return table

    def _all_loops(self) -> list[str]:
        return sorted(self._loop_table())

    @staticmethod
    def _loops_for(image: Path) -> list[str]:
        out = _run(["losetup", "--noheadings", "--output", "NAME", "--associated", str(image)], check=False)
        return out.stdout.split()

    def destroy_instance(self, instance_id: str) -> None:
        iid = instance_id
        with self._lock:
            self._kill_all(iid, lambda: self._processes(iid))
            loops = self._loops_in_instance(iid)
            mntns = self._mntns_file(iid)
            # Dropping the last reference to the mount namespace unmounts everything in it (overlay, /proc,
            # the volumes' file systems) in one go.
            if self._is_pinned(iid):
                _run(["umount", str(mntns)])
            mntns.unlink(missing_ok=True)
            utsns = self._utsns_file(iid)
            if str(utsns) in _mounts_under(self.paths.netns_dir):
                _run(["umount", str(utsns)])
            utsns.unlink(missing_ok=True)
            for loop in loops:
                _run(["losetup", "--detach", loop], check=False)
            self._wait_loops_freed(loops)
            for port in self._ports_of(iid):
                self._del_port(port)
            if iid in self._netns_list():
                _run(["ip", "netns", "del", iid])
            self._remove_dir(self.paths.instance_dir(iid))
        logger.info("instance %s destroyed (power cut)", iid)

    def _wait_loops_freed(self, loops: Sequence[str], deadline: float = KILL_DEADLINE, strict: bool = True) -> None:
        """A loop device detached while a file system on it was still mounted is freed by the kernel once
        that file system goes away (losetup(8), autoclear); the volume may only move after that."""

        before = {name: back for name, back in self._loop_table().items() if name in loops}

        def freed() -> bool:  # by backing file: a freed device may at once be reused by another region
            return not set(before.items()) & set(self._loop_table().items())

        try:
            wait_until(f"{', '.join(loops)} to be freed", freed, deadline=deadline, interval=0.05)
        except Unavailable as exc:
            if strict:
                raise HostError(f"{exc}; something still holds the volume open") from exc
            logger.warning("%s; a process still holds the volume open", exc)

    def _remove_dir(self, path: Path) -> None:
        if not path.exists():
            return
        mounted = _mounts_under(path)
        if mounted:
            raise HostError(f"refusing to delete {path}: still mounted at {', '.join(mounted)}")
        shutil.rmtree(path)

    # NICs ---------------------------------------------------------------------------------------------

    def plug_nic(self, instance_id: str, nic: NicSpec) -> None:
        with self._lock:
            if not self._is_instance(instance_id):
                raise HostError(f"plug_nic {nic.eni_id}: no instance {instance_id} on this machine")
            links = self._links(self.vpc_netns)  # one listing for the whole plug: each cost 5-20 ms of a boot's
            holder = self._port_owner(port_name(nic.eni_id), links)
            if holder == instance_id:
                return
            if holder and holder in self._netns_list():
                raise HostError(f"plug_nic {nic.eni_id}: already plugged into {holder} (unplug it there first)")
            # Left DOWN and unconfigured: the agent configures it, as on an AMI without network helpers.
            self._add_port(
                nic.eni_id,
                f"{instance_id} {nic.eni_id}",
                instance_id,
                eni_ifname(nic.device_index),
                mac=nic.mac,
                ip=nic.ip,
                vpc_links=links,
            )
        logger.info("instance %s: %s plugged as %s", instance_id, nic.eni_id, eni_ifname(nic.device_index))

    def unplug_nic(self, instance_id: str, eni_id: str) -> None:
        with self._lock:
            if port_name(eni_id) in self._ports_of(instance_id):
                self._del_port(port_name(eni_id))
                logger.info("instance %s: %s unplugged", instance_id, eni_id)

    # volumes -----------------------------------------------------------------------------------------

    def attach_volumes(self, instance_id: str, volumes: Sequence[VolumeSpec]) -> None:
        """Each volume's image on a loop device, shown in the instance as the next ``/dev/nvmeXn1`` with its
        by-id link. The volumes an agent attaches at once (a slot's three) come in one call: one loop-table
        listing, and one process in the instance for every node and link (three each cost 45 ms of a boot)."""
        if not volumes:
            return
        with self._lock:
            if not self._is_instance(instance_id):
                names = ", ".join(v.volume_id for v in volumes)
                raise HostError(f"attach_volume {names}: no instance {instance_id} on this machine")
            table = self._loop_table()
            on_loops = {
                v.volume_id: [name for name, back in table.items() if back == os.path.realpath(v.image)]
                for v in volumes
            }
            already = [v for v in volumes if on_loops[v.volume_id]]
            if already:
                script = 'for p in "$@"; do [ -b "$p" ] && echo "$p"; done; true'
                shown = set(
                    self._sh_in(instance_id, script, *(ebs_by_id_path(v.volume_id) for v in already)).stdout.split()
                )
                for volume in already:
                    if ebs_by_id_path(volume.volume_id) not in shown:
                        raise HostError(
                            f"attach_volume {volume.volume_id}: {volume.image} is already on "
                            f"{on_loops[volume.volume_id][0]} (attached to another instance? detach it first)"
                        )
            new = [v for v in volumes if not on_loops[v.volume_id]]
            loops: list[tuple[VolumeSpec, str]] = []
            try:
                for volume in new:
                    self._record(kind="loop", image=str(volume.image), volume_id=volume.volume_id, instance=instance_id)
                    loops.append((volume, attach_loop(volume.image)))
                if loops:
                    # Nitro names EBS volumes /dev/nvme1n1, nvme2n1, ... in attach order (nvme0n1 is the root).
                    args = [
                        a for volume, loop in loops for a in (ebs_by_id_path(volume.volume_id), *map(str, _rdev(loop)))
                    ]
                    self._sh_in(instance_id, _SHOW_VOLUMES, *args)
            except BaseException:
                for _, loop in loops:
                    _run(["losetup", "--detach", loop], check=False)
                raise
        for volume, loop in loops:
            logger.info(
                "instance %s: %s attached (%s) at %s",
                instance_id,
                volume.volume_id,
                loop,
                ebs_by_id_path(volume.volume_id),
            )

    def detach_volume(self, instance_id: str, volume_id: str) -> None:
        by_id = ebs_by_id_path(volume_id)
        with self._lock:
            records = [e for e in self._journaled("loop") if e.get("volume_id") == volume_id]
            images = {Path(e["image"]) for e in records} | {self.paths.volumes_dir / f"{volume_id}.img"}
            loops = [loop for image in images for loop in self._loops_for(image)]
            if self._is_instance(instance_id):
                # Only the device shown in *this* instance: the volume may already be on another one.
                node = self._sh_in(instance_id, '[ -b "$1" ] && stat -L -c \'%t:%T\' "$1" || true', by_id)
                shown = {tuple(int(x, 16) for x in node.stdout.split()[0].split(":"))} if node.stdout.strip() else set()
                loops = [loop for loop in loops if _rdev(loop) in shown]
            elif not records or records[-1].get("instance") != instance_id:
                loops = []
            if self._is_instance(instance_id):
                # EBS detach under a mounted file system is a forced detach; unmount first, lazily, as a
                # process may still hold files open.
                wanted = {"{}:{}".format(*_rdev(loop)) for loop in loops}
                mountinfo = _run([*self._enter(instance_id, chroot=False), "cat", "/proc/self/mountinfo"]).stdout
                for dev, point in sorted(parse_mountinfo(mountinfo), key=lambda r: r[1].count("/"), reverse=True):
                    if dev in wanted:
                        _run([*self._enter(instance_id, chroot=False), "umount", "-l", point])
                self._sh_in(instance_id, 'node=$(readlink -f "$1") && rm -f "$1" "$node"; true', by_id)
            for loop in loops:
                _run(["losetup", "--detach", loop], check=False)
            # A process in the instance may still hold files on it open: like a forced EBS detach, the
            # device then lingers ("detaching") until they are closed; attach elsewhere refuses till then.
            self._wait_loops_freed(loops, deadline=1.0, strict=False)
        if loops:
            logger.info("instance %s: %s detached (%s)", instance_id, volume_id, ", ".join(loops))

    # listing, bastion, exec, faults --------------------------------------------------------------------

    def live_instances(self) -> set[str]:
        return {e["id"] for e in self._journaled("instance")} & self._netns_list()

    def create_bastion(self, name: str, ip: IPv4Address, subnet: IPv4Network) -> None:
        with self._lock:
            if port_name(name) in self._ports_of(name):
                return
            self._record(kind="bastion", name=name)
            self._ensure_netns(name)
            self._ip(name, "link", "del", "eth0", check=False)
            mac = "02:" + ":".join(hashlib.sha1(name.encode()).hexdigest()[i : i + 2] for i in range(0, 10, 2))
            self._add_port(name, f"{name} eth0", name, "eth0", mac=mac, ip=ip)
            self._ip(name, "link", "set", "lo", "up")
            self._ip(name, "addr", "replace", f"{ip}/{subnet.prefixlen}", "dev", "eth0")
            self._ip(name, "link", "set", "eth0", "up")
            self._ip(name, "route", "replace", "default", "via", str(subnet.network_address + 1), "dev", "eth0")
        logger.info("bastion %s at %s", name, ip)

    def exec_in(
        self, namespace: str, argv: Sequence[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        if self._is_instance(namespace):
            full = [*self._enter(namespace), *argv]
            env: dict[str, str] | None = dict(USER_DATA_ENV)
        elif namespace in self._netns_list():
            full, env = ["ip", "netns", "exec", namespace, *argv], None
        else:
            raise HostError(f"exec_in: no namespace {namespace!r} (neither an instance nor a bastion)")
        try:
            return subprocess.run(full, capture_output=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"exec_in {namespace}: {' '.join(argv)} timed out after {timeout}s") from exc

    def pause(self, instance_id: str) -> None:
        self._signal_until_stable(instance_id, signal.SIGSTOP)

    def resume(self, instance_id: str) -> None:
        self._signal_until_stable(instance_id, signal.SIGCONT)

    def _signal_until_stable(self, instance_id: str, sig: int) -> None:
        """Signal every process, then again any that appeared meanwhile (a shell loop forks between our
        scan and its stop), until two scans in a row find nothing new."""
        signalled: set[int] = set()
        quiet = 0
        while quiet < 2:
            fresh = set(self._processes(instance_id)) - signalled
            if fresh:
                self._signal_all(fresh, sig)
                signalled |= fresh
                quiet = 0
            else:
                quiet += 1
                time.sleep(0.02)

    def partition(self, instance_id: str) -> None:
        for port in self._ports_of(instance_id):
            self._ip(self.vpc_netns, "link", "set", port, "down")

    def heal(self, instance_id: str) -> None:
        for port in self._ports_of(instance_id):
            self._ip(self.vpc_netns, "link", "set", port, "up")

    # teardown ----------------------------------------------------------------------------------------

    def _our_namespaces(self, journal: list[dict[str, str]]) -> set[str]:
        """Every namespace this region made: from the journal, and by name as a safety net: our VPC, the
        owners tagged on its bridge ports (instances, ``*-bastion``) and the instances that have a root
        dir here. A namespace of another region on this machine is never in this set."""
        netns = self._netns_list()
        ours = {e["name"] for e in journal if e.get("kind") in ("netns", "bastion")}
        ours |= {e["id"] for e in journal if e.get("kind") == "instance"}
        if self.paths.instances_dir.exists():
            ours |= {d.name for d in self.paths.instances_dir.iterdir()}
        if self.vpc_netns in netns:
            ours.add(self.vpc_netns)
            ours |= {str(link.get("ifalias", "")).split(" ")[0] for link in self._links(self.vpc_netns)}
        return ours & netns

    def _remove_blackholes(self) -> None:
        """Our tagged blackhole routes, unless another region's VPC (a bridge in some other namespace with
        a router address in that CIDR) still exists: the route must stay while any region does."""
        routes = json.loads(_run(["ip", "-j", "route", "show", "proto", ROUTE_PROTO]).stdout or "[]")
        for route in routes:
            if route.get("type") != "blackhole":
                continue
            cidr = IPv4Network(str(route["dst"]), strict=False)
            if any(self._has_router_in(ns, cidr) for ns in self._netns_list()):
                logger.info("keeping blackhole %s: another region's VPC still uses it", cidr)
                continue
            _run(["ip", "route", "del", "blackhole", str(cidr), "proto", ROUTE_PROTO], check=False)

    def _has_router_in(self, netns: str, cidr: IPv4Network) -> bool:
        out = self._ip(netns, "-j", "addr", "show", "dev", BRIDGE, check=False)
        if out.returncode != 0:
            return False
        for link in json.loads(out.stdout or "[]"):
            for addr in link.get("addr_info", []):
                if addr.get("family") == "inet" and IPv4Address(addr["local"]) in cidr:
                    return True
        return False

    def teardown(self) -> None:
        with self._lock:
            journal = self._journal()
            namespaces = self._our_namespaces(journal)
            leftovers: list[str] = []
            pins = set(self.paths.netns_dir.glob("*.mnt")) if self.paths.netns_dir.exists() else set()
            net_inodes = {i for i in (_ns_inode(NETNS_RUN_DIR / n) for n in namespaces) if i}
            pinned = set(_mounts_under(self.paths.netns_dir))
            mnt_inodes = {i for i in (_ns_inode(p) for p in pins if str(p) in pinned) if i}
            self._kill_all("the region", lambda: _pids_in_namespaces(net_inodes, mnt_inodes))

            for point in _mounts_under(self.paths.root):
                _run(["umount", "--lazy", point], check=False)
            images = {Path(e["image"]) for e in journal if e.get("kind") == "loop"}
            if self.paths.volumes_dir.exists():
                images |= set(self.paths.volumes_dir.iterdir())
            for image in images:
                for loop in self._loops_for(image):
                    _run(["losetup", "--detach", loop], check=False)
            # A loop device still in use when detached is freed by the kernel once its file system goes.
            try:
                wait_until(
                    "loop devices of the region to be freed",
                    lambda: not any(self._loops_for(image) for image in images),
                    deadline=KILL_DEADLINE,
                    interval=0.05,
                )
            except Unavailable as exc:
                # Go on removing the rest; the journal stays so a second teardown can finish the job.
                leftovers.append(f"{exc}: {[loop for image in images for loop in self._loops_for(image)]}")
            for name in sorted(namespaces):
                _run(["ip", "netns", "del", name], check=False)
            self._remove_blackholes()
            for path in (self.paths.instances_dir, self.paths.netns_dir):
                try:
                    self._remove_dir(path)
                except HostError as exc:
                    leftovers.append(str(exc))
            if leftovers:
                raise HostError("teardown left something behind: " + "; ".join(leftovers))
            self.paths.journal_file.unlink(missing_ok=True)
        logger.info("region machinery torn down (%d namespaces)", len(namespaces))


# loop(4): ioctls of /dev/loop-control and of a loop device.
LOOP_CTL_GET_FREE = 0x4C82
LOOP_SET_FD = 0x4C00


def attach_loop(image: Path) -> str:
    """``losetup --find --show IMAGE`` without its process (4-5 ms each, three per boot): the first free loop device
    (LOOP_CTL_GET_FREE) bound to the image (LOOP_SET_FD); another binder taking it first (EBUSY) sends us to the next
    free one. https://man7.org/linux/man-pages/man4/loop.4.html"""
    try:
        with contextlib.ExitStack() as opened:
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            opened.callback(os.close, control)
            backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            opened.callback(os.close, backing)
            for _ in range(16):
                device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(loop, LOOP_SET_FD, backing)
                    return device
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                finally:
                    os.close(loop)
    except OSError as exc:  # e.g. a /dev without the new loop device's node yet: losetup(8) knows more ways
        logger.debug("binding %s by ioctl: %s; asking losetup", image, exc)
    # losetup's own errors (a missing image, no loop support) come as HostError, like every command's here
    return _run(["losetup", "--find", "--show", str(image)]).stdout.strip()


def _rdev(device: str) -> tuple[int, int]:
    try:
        rdev = os.stat(device).st_rdev
    except OSError as exc:
        raise HostError(f"stat {device}: {os.strerror(exc.errno or errno.EIO)}") from exc
    return (os.major(rdev), os.minor(rdev))


# Arguments: (by-id path, major, minor) per volume, every by-id path in one directory. Each volume gets the next
# free /dev/nvmeXn1 and its by-id link.
_SHOW_VOLUMES = r"""
set -eu
mkdir -p "${1%/*}"
n=1
while [ $# -ge 3 ]; do
  while [ -e "/dev/nvme${n}n1" ]; do n=$((n+1)); done
  mknod -m 660 "/dev/nvme${n}n1" b "$2" "$3"
  ln -sfn "../../nvme${n}n1" "$1"
  shift 3
done
"""

# Runs inside the instance's fresh namespaces ($1 root, $2 upper, $3 work, $4 host name, $5 IP, $6 pins
# dir). The overlay's lower layer is this machine's root (the AMI); /dev is a small tmpfs with the nodes a server needs
# (devices(7) numbers), as a container runtime would set up.
_ROOT_SETUP = r"""
set -eu
r=$1
# The copy of the pins dir would hold other instances' UTS namespaces alive as long as this one lives
# (mount namespace pins are never copied: mount_namespaces(7)).
umount -l "$6"
mount -t overlay overlay -o "lowerdir=/,upperdir=$2,workdir=$3" "$r"
hostname "$4"
printf '%s %s\n' "$5" "$4" >> "$r/etc/hosts"
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
mount -t tmpfs -o mode=755,size=16m tmpfs "$r/dev"
cd "$r/dev"
mknod -m 666 null c 1 3; mknod -m 666 zero c 1 5; mknod -m 666 full c 1 7
mknod -m 666 random c 1 8; mknod -m 666 urandom c 1 9; mknod -m 666 tty c 5 0
mkdir -m 755 pts disk; mkdir -m 1777 shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts pts
mount -t tmpfs -o mode=1777 tmpfs shm
ln -s pts/ptmx ptmx; ln -s /proc/self/fd fd
ln -s /proc/self/fd/0 stdin; ln -s /proc/self/fd/1 stdout; ln -s /proc/self/fd/2 stderr
mount -t tmpfs -o mode=755 tmpfs "$r/run"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
"""
