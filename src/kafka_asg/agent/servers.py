"""Install, run, supervise and probe ZooKeeper and Kafka as plain processes (issue 4, boot steps 5 and 7).

Each server runs in the foreground of its own session (``setsid``), so one process group holds the JVM and
anything it spawns; stop signals the whole group. Pids are recorded under ``paths.state_dir`` so an agent
restarted on a live instance adopts the running servers instead of starting second copies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO, Any

from kafka_asg.agent.concurrency import preload
from kafka_asg.agent.ports import SERVING_ZK_MODES, ServerName, ServerState, Services, ZkMode
from kafka_asg.errors import ServiceError, Unavailable
from kafka_asg.fsutil import atomic_write, safe_extract
from kafka_asg.paths import AgentPaths
from kafka_asg.retry import wait_until

logger = logging.getLogger(__name__)

# The foreground start scripts of the Apache binary distributions; both end in `exec java`, so the
# session leader we start becomes the JVM itself.
START_SCRIPTS: Mapping[ServerName, str] = {
    "zookeeper": "bin/zkServer.sh",
    "kafka": "bin/kafka-server-start.sh",
}
# The JVM main class, to recognise our server behind a recorded pid (pids are reused).
MAIN_CLASSES: Mapping[ServerName, str] = {
    "zookeeper": "org.apache.zookeeper.server.quorum.QuorumPeerMain",
    "kafka": "kafka.Kafka",
}
# Small heaps: several JVMs share one machine in the rehearsal. zkEnv.sh turns ZK_SERVER_HEAP (MB) into
# -Xmx and zkServer.sh appends JVMFLAGS; kafka-run-class.sh takes KAFKA_HEAP_OPTS as is.
DEFAULT_ENV: Mapping[ServerName, Mapping[str, str]] = {
    "zookeeper": {"ZK_SERVER_HEAP": "256", "JVMFLAGS": "-Xmx256m"},
    "kafka": {"KAFKA_HEAP_OPTS": "-Xmx512m -Xms512m"},
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

MAX_BACKOFF = 60.0
# A server that ran this long before crashing starts its backoff from the beginning again.
STABLE_RUN_SECONDS = 600.0
KILL_WAIT_SECONDS = 10.0

SRVR_TIMEOUT = 2.0
SRVR_MAX_BYTES = 65536
# Printed by ZooKeeper's 4lw handler when the server is not in a working quorum (NIOServerCnxn / ZK_NOT_SERVING).
ZK_NOT_SERVING = "This ZooKeeper instance is not currently serving requests"
_MODE_LINE = re.compile(r"^Mode:\s*(\S+)\s*$", re.MULTILINE)

ZK_PROBE_TIMEOUT = 3.0
# While the own ZooKeeper starts and joins the quorum (about a second), a thread asks it ``srvr`` this often and
# wakes the loop when it serves: the loop's own pace would add up to a cycle to every boot. A longer outage
# (no quorum) is watched once a second.
QUORUM_WATCH_INTERVAL = 0.02
QUORUM_WATCH_FAST_SECONDS = 10.0
QUORUM_WATCH_SECONDS = 120.0


def parse_srvr(answer: str) -> ZkMode:
    """What a ``srvr`` answer says about the server.

    ``srvr`` answers even when the server is not in a quorum (and ``nc`` exits 0), so the answer must be read:
    only a ``Mode: leader|follower|standalone`` line means "serving". Anything else - the not-serving notice,
    an empty answer, another mode (observer, read-only), garbage - is "not serving".
    """
    match = _MODE_LINE.search(answer)
    if match:
        mode = match.group(1).lower()
        if mode == "leader":
            return "leader"
        if mode == "follower":
            return "follower"
        if mode == "standalone":
            return "standalone"
    return "not serving"


def backoff_delay(restarts: int) -> float:
    """Seconds to wait before the next start after ``restarts`` crashes: 2, 4, 8, ... capped at 60."""
    return min(2.0**restarts, MAX_BACKOFF)


def archive_root_name(archive: Path) -> str:
    """``kafka_2.13-3.9.2.tgz`` -> ``kafka_2.13-3.9.2``: the top directory of an Apache binary archive."""
    for suffix in ARCHIVE_SUFFIXES:
        if archive.name.endswith(suffix):
            return archive.name[: -len(suffix)]
    raise ServiceError(f"{archive.name}: not a tar archive (expected one of {', '.join(ARCHIVE_SUFFIXES)})")


@dataclass
class _Running:
    pid: int
    started_at: float  # monotonic (the restart backoff)
    popen: subprocess.Popen[bytes] | None  # None: adopted from a pid file (not our child)
    wall_started_at: float  # wall clock: compared with the broker's registration time


class ProcessServices(Services):
    """:class:`~kafka_asg.agent.ports.Services` with real processes.

    :param paths: install dir, log dir and state dir (pid files).
    :param clock: monotonic clock, for the restart backoff.
    """

    def __init__(self, paths: AgentPaths, clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self.clock = clock
        self._installs: dict[ServerName, Path] = {}
        self._running: dict[ServerName, _Running] = {}
        self._restarts: dict[ServerName, int] = {}
        self._last_exit: dict[ServerName, float] = {}
        self._zk_client: Any = None  # kazoo.client.KazooClient, kept between probes (see broker_registration)
        self._zk_connect: str | None = None
        self._wake: Callable[[], None] | None = None
        self._quorum_watch: threading.Thread | None = None

    # -------------------------------------------------------------------------------------- install

    def install(self, name: ServerName, archive: Path) -> Path:
        """Unpack ``archive`` into ``paths.install_dir/<archive root>`` once per version.

        Atomic: unpacked into a temp dir next to the target, then renamed, so a crash never leaves a
        half-unpacked server that looks installed.
        """
        root_name = archive_root_name(archive)
        dest = self.paths.install_dir / root_name
        if (dest / START_SCRIPTS[name]).is_file():
            self._installs[name] = dest
            return dest
        if dest.exists():
            logger.warning("%s exists without %s: replacing it", dest, START_SCRIPTS[name])
            shutil.rmtree(dest)
        self.paths.install_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root_name}.", dir=self.paths.install_dir))
        try:
            try:
                safe_extract(archive, tmp)
            except (tarfile.TarError, OSError, ValueError) as exc:
                raise ServiceError(f"cannot unpack {archive}: {exc}; download it again") from exc
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1 or not (tops[0] / START_SCRIPTS[name]).is_file():
                raise ServiceError(
                    f"{archive} is not a {name} binary distribution: expected one top directory with "
                    f"{START_SCRIPTS[name]}, found {sorted(p.name for p in tmp.iterdir())}"
                )
            tops[0].rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("installed %s from %s into %s", name, archive.name, dest)
        self._installs[name] = dest
        return dest

    # ----------------------------------------------------------------------------------- processes

    def _pid_file(self, name: ServerName) -> Path:
        return self.paths.state_dir / f"{name}.pid"

    def _log_files(self, name: ServerName) -> tuple[Path, Path]:
        return self.paths.log_dir / f"{name}.stdout.log", self.paths.log_dir / f"{name}.stderr.log"

    def start(self, name: ServerName, config: Path, env: Mapping[str, str]) -> None:
        """Start ``name`` in the foreground of a new session; a no-op when it already runs.

        Backoff is the caller's policy (``state().next_start_at``); this starts when asked.
        """
        if self.state(name).running:
            logger.debug("%s already running", name)
            return
        install = self._installs.get(name)
        if install is None:
            raise ServiceError(f"{name} is not installed: call install() with its archive first")
        server_log_dir = self.paths.log_dir / name
        server_log_dir.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **DEFAULT_ENV[name]}
        # The servers' own log files (log4j/logback) go to the log dir; the console to the files below.
        full_env["ZOO_LOG_DIR" if name == "zookeeper" else "LOG_DIR"] = str(server_log_dir)
        full_env.update(env)
        script = str(install / START_SCRIPTS[name])
        argv = [script, "start-foreground", str(config)] if name == "zookeeper" else [script, str(config)]
        stdout_path, stderr_path = self._log_files(name)
        try:
            with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
                _mark(out, f"starting {' '.join(argv)}")
                _mark(err, f"starting {' '.join(argv)}")
                wall_started_at = time.time()
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    cwd=install,
                    start_new_session=True,  # setsid: its own process group, not tied to the agent's terminal
                )
        except OSError as exc:
            raise ServiceError(f"cannot start {name} ({script}): {exc}") from exc
        self._running[name] = _Running(popen.pid, self.clock(), popen, wall_started_at)
        # No fsync: the pid file lets a restarted agent adopt a running server; after a power loss nothing runs.
        atomic_write(self._pid_file(name), f"{popen.pid}\n", durable=False)
        logger.info("started %s (pid %d) with %s", name, popen.pid, config)
        if name == "zookeeper" and "kazoo.client" not in sys.modules:
            # The registration probe's client (kazoo: 50 ms of imports) loads while ZooKeeper starts, which takes
            # most of a second; loaded at the probe, it came between ZooKeeper serving and Kafka starting.
            preload("kazoo.client", name="import-kazoo", background=True)  # ZooKeeper's JVM comes first

    def _adopt(self, name: ServerName) -> _Running | None:
        """A server left running by a previous agent, recognised by its pid file and main class."""
        try:
            pid = int(self._pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        if not _is_alive(pid, MAIN_CLASSES[name]):
            self._pid_file(name).unlink(missing_ok=True)
            return None
        logger.info("adopting running %s (pid %d) from %s", name, pid, self._pid_file(name))
        running = _Running(pid, self.clock(), None, process_start_time(pid))
        self._running[name] = running
        return running

    def _poll(self, running: _Running, name: ServerName) -> tuple[bool, int | None]:
        """(exited, exit code); the code is None while running and for an adopted process (not our child)."""
        if running.popen is not None:
            code = running.popen.poll()
            return code is not None, code
        return not _is_alive(running.pid, MAIN_CLASSES[name]), None

    def state(self, name: ServerName) -> ServerState:
        running = self._running.get(name) or self._adopt(name)
        if running is not None:
            exited, code = self._poll(running, name)
            if not exited:
                restarts = self._restarts.get(name, 0)
                return ServerState(name, True, running.pid, restarts, None, running.wall_started_at)
            self._record_crash(name, running, code)
        restarts = self._restarts.get(name, 0)
        last_exit = self._last_exit.get(name)
        next_start_at = last_exit + backoff_delay(restarts) if restarts and last_exit is not None else None
        return ServerState(name, False, None, restarts, next_start_at)

    def _record_crash(self, name: ServerName, running: _Running, code: int | None) -> None:
        now = self.clock()
        ran = now - running.started_at
        self._restarts[name] = 1 if ran >= STABLE_RUN_SECONDS else self._restarts.get(name, 0) + 1
        self._last_exit[name] = now
        del self._running[name]
        self._pid_file(name).unlink(missing_ok=True)
        logger.warning(
            "%s (pid %d) exited with code %s after %.0fs; restart %d allowed in %.0fs (see %s)",
            name,
            running.pid,
            "unknown" if code is None else code,
            ran,
            self._restarts[name],
            backoff_delay(self._restarts[name]),
            self._log_files(name)[1],
        )

    def stop(self, name: ServerName, timeout: float) -> None:
        """SIGTERM to the process group, SIGKILL to the group after ``timeout``; then no member is left.

        Kafka runs its controlled shutdown (leadership moved away first) on SIGTERM when
        ``controlled.shutdown.enable`` is true, the default; give it a generous ``timeout``.
        """
        running = self._running.get(name) or self._adopt(name)
        if running is None:
            logger.debug("%s not running: nothing to stop", name)
            return
        # start_new_session made the server a session and group leader: its pgid is its pid.
        pgid = running.pid
        logger.info("stopping %s (pid %d): SIGTERM, SIGKILL after %.0fs", name, running.pid, timeout)
        _signal_group(pgid, signal.SIGTERM)
        if not self._wait_exit(running, name, timeout):
            logger.warning("%s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", name, running.pid, timeout)
            _signal_group(pgid, signal.SIGKILL)
            if not self._wait_exit(running, name, KILL_WAIT_SECONDS):
                raise ServiceError(f"{name} (pid {running.pid}) survived SIGKILL; check for a hung disk (state D)")
        # The leader is gone; children it left in the group would hold ports and files.
        if _group_exists(pgid):
            _signal_group(pgid, signal.SIGKILL)
            # SIGKILL is delivered, not done: wait until no member still runs (zombies are init's to reap).
            try:
                wait_until(f"{name}'s process group to die", lambda: not _group_running(pgid),
                           deadline=KILL_WAIT_SECONDS, interval=0.02)  # fmt: skip
            except Unavailable as exc:
                raise ServiceError(f"{name}: a process of group {pgid} survived SIGKILL ({exc})") from exc
        del self._running[name]
        self._pid_file(name).unlink(missing_ok=True)
        # A deliberate stop is not a crash: the next start has no backoff.
        self._restarts.pop(name, None)
        self._last_exit.pop(name, None)
        logger.info("stopped %s", name)

    def _wait_exit(self, running: _Running, name: ServerName, timeout: float) -> bool:
        try:
            wait_until(
                f"{name} (pid {running.pid}) to exit",
                lambda: self._poll(running, name)[0],
                deadline=timeout,
                interval=0.1,
            )
        except Unavailable:
            return False
        return True

    # --------------------------------------------------------------------------------------- probes

    def zk_mode(self, address: IPv4Address, port: int) -> ZkMode:
        """Send ``srvr`` and read the answer (:func:`parse_srvr`).

        "down" when nothing accepts the connection; a server that accepts but does not answer in time (or
        resets the connection) is "not serving": something holds the port, but it is no working ZooKeeper.
        A server not serving yet is watched (:meth:`_watch_quorum`) until it serves.
        """
        mode = self._srvr(address, port)
        if mode not in SERVING_ZK_MODES:
            self._watch_quorum(address, port)
        return mode

    def _watch_quorum(self, address: IPv4Address, port: int) -> None:
        """Wake the loop the moment ZooKeeper at ``address`` serves (one thread at a time, bounded)."""
        wake = self._wake
        if wake is None or (self._quorum_watch is not None and self._quorum_watch.is_alive()):
            return

        def watch() -> None:
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < QUORUM_WATCH_SECONDS:
                if self._srvr(address, port) in SERVING_ZK_MODES:
                    wake()
                    return
                time.sleep(QUORUM_WATCH_INTERVAL if elapsed < QUORUM_WATCH_FAST_SECONDS else 1.0)

        self._quorum_watch = threading.Thread(target=watch, name="quorum-watch", daemon=True)
        self._quorum_watch.start()

    @staticmethod
    def _srvr(address: IPv4Address, port: int) -> ZkMode:
        try:
            sock = socket.create_connection((str(address), port), timeout=SRVR_TIMEOUT)
        except OSError as exc:
            # Refused, timed out, unreachable: no ZooKeeper listens there.
            logger.debug("srvr %s:%d: %s", address, port, exc)
            return "down"
        chunks: list[bytes] = []
        with sock:
            try:
                sock.sendall(b"srvr")
                size = 0
                while size < SRVR_MAX_BYTES:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            except OSError as exc:
                logger.debug("srvr %s:%d: no complete answer: %s", address, port, exc)
                return "not serving"
        return parse_srvr(b"".join(chunks).decode("utf-8", errors="replace"))

    def broker_registration(self, zk_connect: str, broker_id: int) -> float | None:
        """When ``/brokers/ids/<id>`` was registered (:func:`registration_time`), None if it does not exist.

        :raises Unavailable: ZooKeeper did not answer within a few seconds.
        """
        from kazoo.exceptions import KazooException, NoNodeError
        from kazoo.handlers.threading import KazooTimeoutError

        path = f"/brokers/ids/{broker_id}"
        try:
            client = self._connected_zk_client(zk_connect)
            # The watch (one-shot; every probe sets it again) fires when the node is created or deleted: the
            # loop starts Kafka the moment a dead predecessor's session expires, and sees its own broker
            # register, without polling for either (ZooKeeper Programmer's Guide, "ZooKeeper Watches").
            if client.exists(path, watch=self._on_zk_event) is None:
                return None
            try:
                data, stat = client.get(path)
            except NoNodeError:
                return None
            return registration_time(data, stat.ctime)
        except (KazooTimeoutError, KazooException) as exc:
            self.close_zk_client()
            raise Unavailable(
                f"ZooKeeper {zk_connect} did not answer ({exc!r}): cannot tell if broker {broker_id} is registered"
            ) from exc

    def on_change(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def _on_zk_event(self, event: object) -> None:
        # kazoo's event thread: only signal the loop.
        if self._wake is not None:
            self._wake()

    def _connected_zk_client(self, zk_connect: str) -> Any:
        """One ZooKeeper session for all probes: a session per probe would be two quorum writes (create and
        close session) every cycle, and most of the agent's CPU while it waits for its broker."""
        from kazoo.client import KazooClient

        if self._zk_client is not None and (self._zk_connect != zk_connect or not self._zk_client.connected):
            self.close_zk_client()
        if self._zk_client is None:
            client = KazooClient(hosts=zk_connect, timeout=ZK_PROBE_TIMEOUT, connection_retry={"max_tries": 1})
            self._zk_client, self._zk_connect = client, zk_connect
            client.start(timeout=ZK_PROBE_TIMEOUT)
        return self._zk_client

    def close_zk_client(self) -> None:
        client, self._zk_client, self._zk_connect = self._zk_client, None, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken session must not hide why it broke
                client.stop()
                client.close()


def registration_time(data: bytes, ctime_ms: int) -> float:
    """Wall-clock seconds at which a broker wrote its ``/brokers/ids/<id>`` node.

    Kafka writes ``timestamp`` (ms, the broker host's clock: the agent's, for its own broker) into the
    registration (KafkaZkClient.registerBroker); the node's ctime (the ZooKeeper leader's clock) is the
    fallback for a registration without it.
    """
    try:
        return int(json.loads(data)["timestamp"]) / 1000
    except (ValueError, KeyError, TypeError):
        return ctime_ms / 1000


def process_start_time(pid: int) -> float:
    """Wall-clock start of a process: boot time (``btime`` in /proc/stat) + its ``starttime`` (proc(5))."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))  # fmt: skip
    except (OSError, StopIteration, IndexError, ValueError):
        return 0.0  # unknown: any registration counts (the pre-check behaviour)
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- helpers


def _mark(fh: IO[bytes], text: str) -> None:
    fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} kafka-asg: {text}\n".encode())
    fh.flush()


def _is_alive(pid: int, main_class: str) -> bool:
    """``pid`` is a live (not zombie) process whose command line names ``main_class``."""
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    # Field 3 of /proc/<pid>/stat, after the parenthesised command name, is the state (proc(5)).
    if stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return False
    return main_class in cmdline and _same_network_namespace(pid)


def _same_network_namespace(pid: int) -> bool:
    """In the rehearsal every instance shares this machine's pids: a server of *another* instance (another
    network namespace) may hold a pid we once recorded. Never adopt, let alone signal, that one."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running, zombies not counted (proc(5): state, ppid, pgrp)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
