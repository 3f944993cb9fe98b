"""The node agent's operating system: NICs with iproute2's JSON output, EBS volumes, filesystems, files.

Every instance path (config dirs, mountpoints, /dev/disk/by-id) is mapped below ``paths.root`` so the same
code runs on an instance (``root=/``) and in tests (a temp root). Commands run through ``command_prefix``
(e.g. ``("nsenter", "--net=/run/netns/<ns>")`` in tests) so the NIC code can be pointed at a network
namespace; the prefix must keep the mount namespace (``ip netns exec`` does not), or mounts vanish.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from kafka_asg.agent.concurrency import results_at_once
from kafka_asg.agent.ports import PARTITION_TABLE, DiskState, Host, NicState
from kafka_asg.agent.reads import Recent
from kafka_asg.errors import HostError
from kafka_asg.fsutil import atomic_write
from kafka_asg.paths import AgentPaths

logger = logging.getLogger(__name__)

# Nitro exposes an EBS volume as an NVMe device whose serial is the volume id without its dash; udev links
# it as /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc...
# (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/nvme-ebs-volumes.html). The local region uses the same
# rule (kafka_asg.local.hostapi.ebs_by_id_path); it is copied here because the agent must not import local/.
EBS_BY_ID_PREFIX = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"

COMMAND_TIMEOUT = 60.0
MKFS_TIMEOUT = 600.0
# blkid exits 2 when it finds nothing to report on the device (blkid(8) "RETURN CODE").
BLKID_NOTHING_FOUND = 2


def ebs_device_link(volume_id: str) -> str:
    """``vol-0abc`` -> ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc`` (an instance path)."""
    return EBS_BY_ID_PREFIX + volume_id.replace("-", "")


# The ext4 superblock (https://www.kernel.org/doc/html/latest/filesystems/ext4/globals.html#super-block): 1024 bytes
# into the device; s_magic 0xEF53 at +0x38, s_feature_incompat at +0x60, s_volume_name (16 bytes) at +0x78.
SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = 0xEF53
INCOMPAT_EXTENTS = 0x40  # an ext2/ext3 superblock has the magic too, not extents


class _NeedsProbe(Exception):
    """A device only ``blkid`` can tell about (LinuxHost.disks probes those side by side)."""


def ext4_superblock(device: Path) -> dict[str, str]:
    """``{"TYPE": "ext4", "LABEL": ...}`` when ``device`` starts with an ext4 superblock, else ``{}`` (then ``blkid``
    decides). A read of 2 KB instead of a ``blkid`` process per slot volume at every boot (three were 20-30 ms of
    it). It can only ever say "a filesystem is there", never "empty": it never leads to formatting anything."""
    try:
        with open(device, "rb") as fh:
            fh.seek(SUPERBLOCK_OFFSET)
            block = fh.read(0x88)
    except OSError:
        return {}
    if len(block) < 0x88 or int.from_bytes(block[0x38:0x3A], "little") != EXT_MAGIC:
        return {}
    if not int.from_bytes(block[0x60:0x64], "little") & INCOMPAT_EXTENTS:
        return {}
    label = block[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return {"TYPE": "ext4", **({"LABEL": label} if label else {})}


def parse_blkid_export(text: str) -> dict[str, str]:
    """``blkid -o export`` output: ``KEY=value`` lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _unescape_mount_field(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal (proc(5)).
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mounts(text: str) -> list[tuple[str, Path, str]]:
    """``/proc/self/mounts`` -> ``[(source, mountpoint, fstype), ...]``."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.append((_unescape_mount_field(fields[0]), Path(_unescape_mount_field(fields[1])), fields[2]))
    return out


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc


def mount_syscall(device: Path, target: Path, filesystem: str) -> None:
    """mount(2) with no flags or options, as ``mount -t FILESYSTEM DEVICE TARGET`` does: the type is known from
    the probe, so neither mount(8)'s process nor its own blkid probe is needed (10-15 ms a volume, 1 ms this way).
    https://man7.org/linux/man-pages/man2/mount.2.html"""
    if _libc().mount(os.fsencode(device), os.fsencode(target), filesystem.encode(), 0, None) == 0:
        return
    code = ctypes.get_errno()
    hint = {
        errno.EINVAL: f": is it really {filesystem}? (a bad superblock, or the device is mounted already)",
        errno.ENODEV: f": this kernel has no {filesystem} support",
        errno.EBUSY: ": the device is in use or something is mounted there",
        errno.EPERM: ": the agent needs root (CAP_SYS_ADMIN)",
    }.get(code, "")
    raise HostError(f"mount {device} at {target} ({filesystem}) failed: {os.strerror(code)}{hint}")


class LinuxHost(Host):
    """:class:`~kafka_asg.agent.ports.Host` on Linux (iproute2, util-linux, e2fsprogs).

    :param paths: instance paths; ``paths.root`` is prepended to every instance path.
    :param command_prefix: prepended to every command, e.g. ``("nsenter", "--net=/run/netns/ns1")``.
    :param reads_max_age: seconds a found NIC's state, and an unmounted device's ``blkid`` probe, are reused
        (0: never). A NIC takes four ``ip`` processes to read; the loop's 0.2 s waits on its own servers would
        otherwise spawn twenty a second, and each boot step (NIC, mounts) would probe the three volumes again.
        Below the boot pace, so only those waits and back-to-back steps reuse them; :meth:`configure_nic`
        forgets the NIC, :meth:`make_filesystem` and :meth:`mount` the device's probe (and make_filesystem
        probes afresh before it would write: a reused probe can never lead to formatting a filesystem).
    """

    def __init__(
        self, paths: AgentPaths, command_prefix: Sequence[str] = (), reads_max_age: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.paths = paths
        self.command_prefix = tuple(command_prefix)
        self._nics = Recent(clock, reads_max_age)  # MAC -> NicState
        self._probes = Recent(clock, reads_max_age)  # (volume id, device, st_rdev) -> blkid probe

    # ------------------------------------------------------------------------------------- commands

    def _run(
        self,
        argv: Sequence[str],
        ok_codes: Sequence[int] = (0,),
        timeout: float = COMMAND_TIMEOUT,
        stdin_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self.command_prefix, *argv]
        # stdin from /dev/null unless given: mke2fs and friends must never sit waiting for a "proceed anyway?".
        stdin = {"input": stdin_text} if stdin_text is not None else {"stdin": subprocess.DEVNULL}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **stdin)
        except FileNotFoundError as exc:
            raise HostError(f"{cmd[0]} not found: install it (iproute2, util-linux, e2fsprogs)") from exc
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"{' '.join(cmd)} did not finish within {timeout:.0f}s") from exc
        if proc.returncode not in ok_codes:
            raise HostError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _ip_change(self, *args: str, exists_ok: bool = False) -> None:
        """An ``ip`` change; with ``exists_ok``, "File exists" / "already assigned" count as done (a racing
        amazon-ec2-net-utils may have added the same object)."""
        proc = self._run(["ip", *args], ok_codes=(0, 2) if exists_ok else (0,))
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "File exists" in err or "already assigned" in err:
                logger.debug("ip %s: already there (%s)", " ".join(args), err)
                return
            raise HostError(f"ip {' '.join(args)} failed: {err}")

    def _ip_changes(self, *changes: tuple[tuple[str, ...], bool]) -> None:
        """Several ``(args, exists_ok)`` ``ip`` changes in one process (``ip -batch -``: one fork and exec
        instead of one per change, 5-20 ms apiece while the region plugs devices). A failed batch stops at its
        first error: then each change runs again on its own (:meth:`_ip_change`), so one already there counts
        as done and a real failure names its command."""
        script = "".join(" ".join(args) + "\n" for args, _ in changes)
        if self._run(["ip", "-batch", "-"], ok_codes=(0, 1, 2), stdin_text=script).returncode == 0:
            return
        for args, exists_ok in changes:
            self._ip_change(*args, exists_ok=exists_ok)

    # ------------------------------------------------------------------------------------------ NICs

    def _ip_json_batch(self, *commands: tuple[str, ...]) -> list[list[dict[str, Any]]]:
        """Several ``ip -j`` reads in one process (``ip -j -batch -``: one JSON list per command, in order)."""
        script = "".join(" ".join(args) + "\n" for args in commands)
        text = self._run(["ip", "-j", "-batch", "-"], stdin_text=script).stdout
        decoder, at = json.JSONDecoder(), 0
        out: list[list[dict[str, Any]]] = []
        try:
            while len(out) < len(commands):
                while at < len(text) and text[at].isspace():
                    at += 1
                data, at = decoder.raw_decode(text, at)
                if not isinstance(data, list):
                    raise ValueError(f"expected a JSON list, got {type(data).__name__}")
                out.append([entry for entry in data if isinstance(entry, dict)])
        except ValueError as exc:
            listing = "; ".join(" ".join(args) for args in commands)
            raise HostError(f"ip -j -batch ({listing}): unreadable output ({exc}); needs iproute2 >= 4.14") from exc
        return out

    @staticmethod
    def _inet_addresses(link: Mapping[str, Any]) -> tuple[IPv4Address, ...]:
        return tuple(
            IPv4Address(info["local"])
            for info in link.get("addr_info", [])
            if info.get("family") == "inet" and "local" in info
        )

    @staticmethod
    def _rule_tables(rules: Sequence[Mapping[str, Any]], ip: IPv4Address) -> set[str]:
        """Tables of the ``from <ip>`` rules (iproute2 omits ``srclen`` for a /32 source)."""
        return {
            str(rule["table"])
            for rule in rules
            if rule.get("src") == str(ip) and rule.get("srclen", 32) == 32 and "table" in rule
        }

    def nic_by_mac(self, mac: str) -> NicState | None:
        wanted = mac.lower()
        # A NIC not there yet is looked for again at once: it is being hot-plugged.
        return self._nics.get(wanted, lambda: self._read_nic(wanted), keep=lambda nic: nic is not None)

    def _read_nic(self, wanted: str) -> NicState | None:
        # Links with their addresses, rules, routes of every table: one `ip` process (four, one after another,
        # were 15-30 ms of each boot step that looked at the NIC while the region plugged devices).
        links, rules, routes = self._ip_json_batch(
            ("addr", "show"), ("rule", "show"), ("route", "show", "table", "all")
        )
        for link in links:
            if str(link.get("address", "")).lower() != wanted or "ifname" not in link:
                continue
            ifname = str(link["ifname"])
            addresses = self._inet_addresses(link)
            tables = {table for ip in addresses for table in self._rule_tables(rules, ip)}
            has_policy_route = any(
                route.get("dst") == "default"
                and route.get("dev") == ifname
                and str(route.get("table", "main")) in tables
                for route in routes
            )
            return NicState(
                ifname=ifname,
                mac=wanted,
                up="UP" in link.get("flags", []),
                addresses=addresses,
                has_policy_route=has_policy_route,
            )
        return None

    def _configured(self, ifname: str, ip: IPv4Address) -> tuple[set[IPv4Address], set[str]]:
        """The IPv4 addresses on ``ifname``, and the tables of the ``from <ip>`` rules (one ``ip`` process)."""
        links, rules = self._ip_json_batch(("addr", "show", "dev", ifname), ("rule", "show"))
        return {a for link in links for a in self._inet_addresses(link)}, self._rule_tables(rules, ip)

    def configure_nic(self, ifname: str, ip: IPv4Address, subnet: IPv4Network, table: int) -> None:
        """The fixed IP on ``ifname`` with policy routing, as AL2023's amazon-ec2-net-utils sets it up.

        The ENI is in the same subnet as the primary NIC: ``noprefixroute`` keeps the main table's subnet route
        on the primary NIC, and ``from <ip> lookup <table>`` sends replies from the fixed IP out of its own NIC
        (AWS: two NICs in one subnet route asymmetrically; the VPC drops packets whose source IP does not
        belong to the NIC they leave by). Idempotent.
        """
        self._nics.forget()
        if ip not in subnet:
            raise HostError(f"{ip} is not in {subnet}: the slot's ENI must be in its subnet")
        gateway = subnet.network_address + 1  # the VPC router: base+1 of every subnet
        changes: list[tuple[tuple[str, ...], bool]] = []
        addresses, tables = self._configured(ifname, ip)
        if ip not in addresses:
            changes.append((("addr", "add", f"{ip}/{subnet.prefixlen}", "dev", ifname, "noprefixroute"), True))
        changes += [
            (("link", "set", "dev", ifname, "up"), False),
            (("route", "replace", str(subnet), "dev", ifname, "src", str(ip), "table", str(table)), False),
            (("route", "replace", "default", "via", str(gateway), "dev", ifname, "table", str(table)), False),
        ]
        if str(table) not in tables:
            changes.append((("rule", "add", "from", str(ip), "lookup", str(table), "priority", str(table)), True))
        self._ip_changes(*changes)
        logger.info("configured %s: %s/%d, policy routing via table %d", ifname, ip, subnet.prefixlen, table)

    # ----------------------------------------------------------------------------------------- disks

    def _blkid(self, device: Path) -> dict[str, str]:
        # -p probes the device itself, bypassing the blkid cache, which may be stale or absent.
        proc = self._run(["blkid", "-p", "-o", "export", str(device)], ok_codes=(0, BLKID_NOTHING_FOUND))
        return parse_blkid_export(proc.stdout) if proc.returncode == 0 else {}

    def _recent_blkid(self, volume_id: str, device: Path) -> dict[str, str]:
        """:meth:`_blkid`, reused for ``reads_max_age``; keyed by volume id and device node, so a device name
        another volume gets after a detach is probed afresh."""
        return self._probes.get((volume_id, device, device.stat().st_rdev), lambda: self._blkid(device))

    def _mounted_at(self, device: Path) -> Path | None:
        mount = self._mount_of(device)
        return mount[0] if mount is not None else None

    def _mount_of(self, device: Path) -> tuple[Path, str] | None:
        """(instance mountpoint, file system type) of ``device``, None if it is not mounted."""
        try:
            rdev = device.stat().st_rdev
            mounts = Path("/proc/self/mounts").read_text()
        except OSError as exc:
            raise HostError(f"cannot inspect {device} or /proc/self/mounts: {exc}") from exc
        for source, mountpoint, fstype in parse_mounts(mounts):
            if not source.startswith("/"):
                continue
            try:
                same = os.stat(source).st_rdev == rdev
            except OSError:
                continue
            if same:
                return self._instance_path(mountpoint), fstype
        return None

    def _real(self, path: Path) -> Path:
        """An instance path (``/var/lib/...``) as a real path below ``paths.root``."""
        return self.paths.under_root(str(path))

    def _instance_path(self, real: Path) -> Path:
        """A real path as the instance sees it (the inverse of ``paths.under_root``)."""
        root = self.paths.root.resolve()
        try:
            return Path("/") / real.relative_to(root)
        except ValueError:
            return real

    def disk(self, volume_id: str) -> DiskState | None:
        return self._disk(volume_id, blkid=True)

    def _disk(self, volume_id: str, *, blkid: bool) -> DiskState | None:
        """:meth:`disk`; without ``blkid``, a device that only a ``blkid`` process could tell about raises
        _NeedsProbe."""
        link = self.paths.under_root(ebs_device_link(volume_id))
        if not link.exists():
            return None
        device = link.resolve()
        if not device.is_block_device():
            raise HostError(f"{link} resolves to {device}, which is not a block device")
        mount = self._mount_of(device)
        if mount is not None:
            # Mounted: the kernel says which file system it is; no blkid process every cycle (label unknown,
            # nothing decides on it). make_filesystem probes again anyway before it would write.
            return DiskState(device=device, filesystem=mount[1], label=None, mounted_at=mount[0])
        found = ext4_superblock(device)
        if not found and not blkid and not self._probes.has((volume_id, device, device.stat().st_rdev)):
            raise _NeedsProbe(volume_id)
        probe = found or self._recent_blkid(volume_id, device)
        # A partition table counts as "not empty": never format over someone's partitions.
        filesystem = probe.get("TYPE") or (PARTITION_TABLE + probe["PTTYPE"] if "PTTYPE" in probe else None)
        return DiskState(device=device, filesystem=filesystem, label=probe.get("LABEL"), mounted_at=None)

    def shows(self, volume_id: str) -> bool:
        return self.paths.under_root(ebs_device_link(volume_id)).exists()

    def disks(self, volume_ids: Sequence[str]) -> dict[str, DiskState | None]:
        """:meth:`disk` of each, the volumes not probed yet probed at once: a slot's three volumes show up
        together, and one ``blkid`` after another was 20-30 ms of a boot. (One ``blkid -p`` with several
        devices will not do: it stops at the first device on which it finds nothing.)"""
        out: dict[str, DiskState | None] = {}
        unprobed = []
        for volume_id in volume_ids:
            try:
                out[volume_id] = self._disk(volume_id, blkid=False)
            except _NeedsProbe:
                unprobed.append(volume_id)
        if len(unprobed) > 1:
            out.update(results_at_once({volume_id: partial(self.disk, volume_id) for volume_id in unprobed}))
        else:
            out.update({volume_id: self.disk(volume_id) for volume_id in unprobed})
        return {volume_id: out[volume_id] for volume_id in volume_ids}

    def make_filesystem(self, device: Path, label: str) -> None:
        self._forget_probe(device)
        probe = self._blkid(device)
        if probe:
            found = probe.get("TYPE") or probe.get("PTTYPE") or ", ".join(sorted(probe))
            raise HostError(
                f"refusing to format {device}: it already holds {found} (label {probe.get('LABEL', '-')}); "
                "data is never overwritten - wipe it by hand if it really is yours to lose"
            )
        # ext4 labels are at most 16 bytes (mke2fs(8) -L).
        if len(label.encode()) > 16:
            logger.warning("ext4 label %r is longer than 16 bytes: using %r", label, label[:16])
        # nodiscard: a new EBS volume has nothing to trim, and discarding a large one takes minutes.
        self._run(["mkfs.ext4", "-q", "-E", "nodiscard", "-L", label[:16], str(device)], timeout=MKFS_TIMEOUT)
        logger.info("created ext4 filesystem %r on %s", label[:16], device)

    def _forget_probe(self, device: Path) -> None:
        self._probes.forget(lambda key: isinstance(key, tuple) and key[1] == device)

    def mount(self, device: Path, mountpoint: Path, filesystem: str) -> None:
        """Mount ``device`` at the instance path ``mountpoint`` (mkdir -p). Idempotent; HostError if the
        device is mounted elsewhere or something else is mounted there."""
        self._forget_probe(device)
        target = self._real(mountpoint)
        current = self._mounted_at(device)
        if current is not None:
            if self._real(current).resolve() == target.resolve():
                logger.debug("%s already mounted at %s", device, mountpoint)
                return
            raise HostError(f"{device} is already mounted at {current}, not at {mountpoint}: unmount it first")
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HostError(f"cannot create mountpoint {target}: {exc}") from exc
        if os.path.ismount(target):
            raise HostError(f"something else is already mounted at {target}: refusing to mount {device} over it")
        mount_syscall(device, target, filesystem)
        logger.info("mounted %s (%s) at %s", device, filesystem, target)

    # ----------------------------------------------------------------------------------------- files

    def read_file(self, path: Path) -> str | None:
        try:
            return self._real(path).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HostError(f"cannot read {self._real(path)}: {exc}") from exc

    def remove_empty_dir(self, path: Path) -> None:
        """rmdir: only an empty directory goes (the ``lost+found`` of a fresh ext4, which Kafka would take for
        a bad partition directory); absent or not empty is a no-op."""
        target = self._real(path)
        try:
            target.rmdir()
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                logger.debug("kept %s: %s", target, exc.strerror)
                return
            raise HostError(f"cannot remove {target}: {exc}") from exc
        logger.info("removed empty directory %s", target)

    def write_file(self, path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = True) -> None:
        try:
            atomic_write(self._real(path), data, mode, durable=durable)
        except OSError as exc:
            raise HostError(f"cannot write {self._real(path)}: {exc}") from exc
