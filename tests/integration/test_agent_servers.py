"""ProcessServices with real processes.

The first part uses tiny stand-in distributions (shell scripts in a tar, no JVM) to pin down install,
process groups, crash backoff and adoption. The ``jvm`` part runs the real ZooKeeper 3.8.7 and Kafka 3.9.2
from the artifacts cache, on 127.0.0.x only, and stops every JVM in ``finally``.
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from kafka_asg.agent.ports import ServerName, ServerState
from kafka_asg.agent.render import myid_text, render_server_properties, render_zoo_cfg
from kafka_asg.agent.servers import MAIN_CLASSES, ProcessServices
from kafka_asg.config import AsgSize, ClusterConfig, Ports, ServerSpec, Slot, Subnet, VolumeSpec
from kafka_asg.errors import ServiceError, Unavailable
from kafka_asg.paths import AgentPaths, CachePaths
from kafka_asg.retry import wait_until


def make_archive(directory: Path, filename: str, files: dict[str, str]) -> Path:
    """A .tar.gz holding ``files`` (relative path -> shell script text), all executable."""
    archive = directory / filename
    with tarfile.open(archive, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return archive


# A ZooKeeper stand-in: leaves a TERM-immune child in its group, then becomes a TERM-immune "JVM" whose
# command line names ZooKeeper's main class (as `exec java ... QuorumPeerMain` does).
STUBBORN_ZK = f"""#!/bin/sh
echo "args: $*"
(trap '' TERM; exec sleep 300) &
echo $! > "$ZOO_LOG_DIR/child.pid"
env > "$ZOO_LOG_DIR/env.txt"
exec python3 -c '
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.environ["ZOO_LOG_DIR"] + "/ready", "w").close()
time.sleep(300)
' {MAIN_CLASSES["zookeeper"]}
"""
CRASHING_KAFKA = """#!/bin/sh
echo "broken config $1" >&2
exit 3
"""
# Exits on SIGTERM but leaves a TERM-immune child behind in its group.
POLITE_KAFKA = f"""#!/bin/sh
(trap '' TERM; exec sleep 300) &
exec python3 -c 'import time; time.sleep(300)' {MAIN_CLASSES["kafka"]}
"""


def text_when_there(path: Path) -> str | None:
    return path.read_text() if path.is_file() and path.stat().st_size else None


def live_members(pgid: int) -> list[int]:
    """Non-zombie processes of group ``pgid`` (zombies are left for init, which may be slow to reap)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp (proc(5)).
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def group_alive(pgid: int) -> bool:
    return bool(live_members(pgid))


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ProcessServices]:
    svc = ProcessServices(AgentPaths(root=tmp_path / "root"))
    try:
        yield svc
    finally:
        for name in ("zookeeper", "kafka"):
            svc.stop(name, timeout=1)


def test_install_once_per_version_atomically(services: ProcessServices, tmp_path: Path) -> None:
    archive = make_archive(
        tmp_path, "apache-zookeeper-9.9.9-bin.tar.gz", {"apache-zookeeper-9.9.9-bin/bin/zkServer.sh": "#!/bin/sh\n"}
    )
    home = services.install("zookeeper", archive)
    assert home == services.paths.install_dir / "apache-zookeeper-9.9.9-bin"
    assert os.access(home / "bin/zkServer.sh", os.X_OK)
    marker = home / "marker"
    marker.write_text("kept")
    archive.unlink()  # a second install must not need (or re-unpack) the archive
    assert services.install("zookeeper", archive) == home
    assert marker.read_text() == "kept"
    assert sorted(p.name for p in services.paths.install_dir.iterdir()) == ["apache-zookeeper-9.9.9-bin"]


def test_install_refuses_an_archive_without_the_start_script(services: ProcessServices, tmp_path: Path) -> None:
    archive = make_archive(tmp_path, "kafka_2.13-9.9.9.tgz", {"kafka_2.13-9.9.9/bin/other.sh": "#!/bin/sh\n"})
    with pytest.raises(ServiceError, match=r"kafka-server-start\.sh"):
        services.install("kafka", archive)
    assert list(services.paths.install_dir.iterdir()) == []  # no half-installed server, no temp dir
    with pytest.raises(ServiceError, match="not installed"):
        services.start("kafka", tmp_path / "server.properties", {})


def test_stop_kills_the_whole_process_group(services: ProcessServices, tmp_path: Path) -> None:
    archive = make_archive(
        tmp_path, "apache-zookeeper-9.9.9-bin.tar.gz", {"apache-zookeeper-9.9.9-bin/bin/zkServer.sh": STUBBORN_ZK}
    )
    services.install("zookeeper", archive)
    config = tmp_path / "zoo.cfg"
    services.start("zookeeper", config, {"EXTRA": "from-agent"})
    state = services.state("zookeeper")
    assert state.running and state.pid is not None
    pid = state.pid
    services.start("zookeeper", config, {})  # already running: no second copy
    assert services.state("zookeeper").pid == pid

    log_dir = services.paths.log_dir / "zookeeper"
    child = int(wait_until("child pid", lambda: text_when_there(log_dir / "child.pid"), deadline=10))
    env = wait_until("env", lambda: text_when_there(log_dir / "env.txt"), deadline=10)
    assert f"ZOO_LOG_DIR={log_dir}" in env
    assert "JVMFLAGS=-Xmx256m" in env
    assert "EXTRA=from-agent" in env
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session and group
    wait_until("the stand-in to ignore SIGTERM", (log_dir / "ready").is_file, deadline=10)

    assert sorted(live_members(pid)) == sorted([pid, child])
    started = time.monotonic()
    services.stop("zookeeper", timeout=1.0)
    assert time.monotonic() - started >= 1.0  # SIGTERM was ignored: SIGKILL only after the timeout
    assert not group_alive(pid)
    assert child not in live_members(pid)
    state = services.state("zookeeper")
    assert (state.running, state.pid, state.restarts, state.next_start_at) == (False, None, 0, None)
    assert not (services.paths.state_dir / "zookeeper.pid").exists()
    stdout = (services.paths.log_dir / "zookeeper.stdout.log").read_text()
    assert f"args: start-foreground {config}" in stdout


def test_crash_is_counted_with_backoff(tmp_path: Path) -> None:
    now = [1000.0]
    services = ProcessServices(AgentPaths(root=tmp_path / "root"), clock=lambda: now[0])
    services.install(
        "kafka",
        make_archive(tmp_path, "kafka_2.13-9.9.9.tgz", {"kafka_2.13-9.9.9/bin/kafka-server-start.sh": CRASHING_KAFKA}),
    )
    for restarts, delay in ((1, 2.0), (2, 4.0), (3, 8.0)):
        services.start("kafka", tmp_path / "server.properties", {})
        now[0] += 1

        def crashed(count: int = restarts) -> ServerState | None:
            state = services.state("kafka")
            return state if state.restarts == count else None

        state = wait_until("the crash", crashed, deadline=10)
        assert (state.running, state.pid, state.next_start_at) == (False, None, now[0] + delay)
    stderr = (services.paths.log_dir / "kafka.stderr.log").read_text()
    assert f"broken config {tmp_path / 'server.properties'}" in stderr
    assert "KAFKA_HEAP_OPTS" not in stderr
    services.stop("kafka", timeout=1)  # nothing running: no-op, the crash history stays
    assert services.state("kafka").restarts == 3


def test_a_new_agent_adopts_the_running_server(tmp_path: Path) -> None:
    paths = AgentPaths(root=tmp_path / "root")
    first = ProcessServices(paths)
    first.install(
        "kafka",
        make_archive(tmp_path, "kafka_2.13-9.9.9.tgz", {"kafka_2.13-9.9.9/bin/kafka-server-start.sh": POLITE_KAFKA}),
    )
    first.start("kafka", tmp_path / "server.properties", {})
    pid = first.state("kafka").pid
    assert pid is not None
    try:
        wait_until("exec", lambda: MAIN_CLASSES["kafka"] in Path(f"/proc/{pid}/cmdline").read_text(), deadline=10)
        second = ProcessServices(paths)  # the agent restarted; the server kept running
        assert second.state("kafka").pid == pid
        wait_until("the child", lambda: len(live_members(pid)) >= 2, deadline=10)
        started = time.monotonic()
        second.stop("kafka", timeout=5)
        assert time.monotonic() - started < 5  # the leader obeyed SIGTERM; its child was killed after it
        first.state("kafka")  # reap: the test process is the server's parent, unlike on an instance
        assert not group_alive(pid)
        assert not (paths.state_dir / "kafka.pid").exists()
    finally:
        first.stop("kafka", timeout=1)


def test_a_stale_pid_file_is_not_adopted(tmp_path: Path) -> None:
    paths = AgentPaths(root=tmp_path / "root")
    paths.state_dir.mkdir(parents=True)
    (paths.state_dir / "zookeeper.pid").write_text(f"{os.getpid()}\n")  # alive, but not ZooKeeper
    state = ProcessServices(paths).state("zookeeper")
    assert (state.running, state.pid) == (False, None)
    assert not (paths.state_dir / "zookeeper.pid").exists()


# ---------------------------------------------------------------------------------------------- real JVMs

ARTIFACTS = CachePaths.default().artifacts_dir
ZK_ARCHIVE = ARTIFACTS / "apache-zookeeper-3.8.7-bin.tar.gz"
KAFKA_ARCHIVE = ARTIFACTS / "kafka_2.13-3.9.2.tgz"
LOOPBACK = Subnet("local", IPv4Network("127.0.0.0/8"))


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return ports


def loopback_cluster(slot_count: int) -> ClusterConfig:
    """A cluster whose slots are 127.0.0.1, 127.0.0.2, ...: every address is loopback."""
    client, quorum, election, kafka = free_ports(4)
    slots = tuple(Slot(n, "local", IPv4Address(f"127.0.0.{n}"), LOOPBACK) for n in range(1, slot_count + 1))
    return ClusterConfig(
        name="kasg-it",
        region="local",
        mode="zookeeper",
        vpc_cidr=LOOPBACK.cidr,
        vpc_id=None,
        subnets=(LOOPBACK,),
        slots=slots,
        ports=Ports(zk_client=client, zk_quorum=quorum, zk_election=election, kafka=kafka),
        bucket="unused",
        zookeeper_config=Path("zookeeper.config"),
        kafka_config=Path("kafka.config"),
        zookeeper=ServerSpec("3.8.7", "archives/apache-zookeeper-3.8.7-bin.tar.gz"),
        kafka=ServerSpec("3.9.2", "archives/kafka_2.13-3.9.2.tgz"),
        volumes="per-instance",
        volume=VolumeSpec(),
        instance_type="local",
        ami="local",
        asg=AsgSize(slot_count, slot_count, slot_count),
        bastion_security_group=None,
    )


def write_zookeeper(tmp_path: Path, cfg: ClusterConfig) -> Path:
    data = tmp_path / "zk-data"
    data.mkdir()
    (data / "myid").write_text(myid_text(cfg.slot(1)))
    # The seed's base config with our dirs; clientPortAddress keeps the client port on loopback.
    base = (
        f"tickTime=2000\ndataDir={data}\ndataLogDir={tmp_path / 'zk-txlog'}\ninitLimit=15\nsyncLimit=2\n"
        "autopurge.purgeInterval=1\nclientPortAddress=127.0.0.1\n"
    )
    config = tmp_path / "zoo.cfg"
    config.write_text(render_zoo_cfg(base, cfg, cfg.slot(1)))
    return config


@pytest.fixture
def jvm_services(tmp_path: Path) -> Iterator[ProcessServices]:
    if not ZK_ARCHIVE.is_file():
        pytest.skip(f"{ZK_ARCHIVE} not built yet (kafka_asg.artifacts.ensure_artifacts)")
    svc = ProcessServices(AgentPaths(root=tmp_path / "root"))
    try:
        yield svc
    finally:
        names: tuple[ServerName, ...] = ("kafka", "zookeeper")
        for name in names:
            svc.stop(name, timeout=30)


@pytest.mark.jvm
def test_zookeeper_standalone_and_broker_registration(jvm_services: ProcessServices, tmp_path: Path) -> None:
    cfg = loopback_cluster(1)
    changed = threading.Event()
    jvm_services.on_change(changed.set)
    jvm_services.install("zookeeper", ZK_ARCHIVE)
    jvm_services.start("zookeeper", write_zookeeper(tmp_path, cfg), {})
    pid = jvm_services.state("zookeeper").pid
    assert pid is not None
    localhost = IPv4Address("127.0.0.1")
    # Just started, the JVM is not listening yet: the probe says so and watches until it serves.
    assert jvm_services.zk_mode(localhost, cfg.ports.zk_client) in ("down", "not serving")
    assert changed.wait(60), "the quorum watch did not wake the loop when ZooKeeper came to serve"
    assert jvm_services.zk_mode(localhost, cfg.ports.zk_client) == "standalone"
    changed.clear()
    zk_connect = f"127.0.0.1:{cfg.ports.zk_client}"
    assert jvm_services.broker_registration(zk_connect, 1) is None  # and a watch on /brokers/ids/1

    if KAFKA_ARCHIVE.is_file():
        slot = cfg.slot(1)
        base = f"log.dir={tmp_path / 'kafka-log'}\nnum.partitions=3\noffsets.topic.replication.factor=1\n"
        properties = tmp_path / "server.properties"
        properties.write_text(render_server_properties(base, cfg, slot, "local-az1"))
        jvm_services.install("kafka", KAFKA_ARCHIVE)
        jvm_services.start("kafka", properties, {})
        started_at = jvm_services.state("kafka").started_at
        assert started_at is not None and abs(started_at - time.time()) < 60
        # The probe's watch wakes the loop when the broker registers: no poll needed to see it.
        assert changed.wait(120), "no watch event for /brokers/ids/1 being created"
        wait_until(
            "broker 1 registered", lambda: jvm_services.broker_registration(zk_connect, 1) is not None, deadline=120
        )
        # Kafka's own timestamp: after the process started, and not in the future.
        registered_at = jvm_services.broker_registration(zk_connect, 1)
        assert registered_at is not None and started_at <= registered_at <= time.time()
        # Kafka 3.9 halts without a controlled shutdown when SIGTERM arrives before its startup completed
        # ("Kafka server is still starting up, cannot shut down!"), leaving /brokers/ids/1 until the session
        # expires: stop it only once it logged "started".
        stdout = jvm_services.paths.log_dir / "kafka.stdout.log"
        wait_until("Kafka started", lambda: "[KafkaServer id=1] started" in stdout.read_text(), deadline=120)
        changed.clear()
        assert jvm_services.broker_registration(zk_connect, 1) is not None  # the watch, set again
        jvm_services.stop("kafka", timeout=60)
        assert changed.wait(30), "no watch event for /brokers/ids/1 being deleted"
        assert jvm_services.broker_registration(zk_connect, 1) is None  # the ephemeral node left with it

    jvm_services.stop("zookeeper", timeout=30)
    assert not group_alive(pid)
    assert jvm_services.zk_mode(localhost, cfg.ports.zk_client) == "down"


@pytest.mark.jvm
def test_zookeeper_alone_in_a_three_node_ensemble_is_not_serving(jvm_services: ProcessServices, tmp_path: Path) -> None:
    cfg = loopback_cluster(3)
    jvm_services.install("zookeeper", ZK_ARCHIVE)
    jvm_services.start("zookeeper", write_zookeeper(tmp_path, cfg), {})
    localhost = IPv4Address("127.0.0.1")
    # It listens and answers srvr, but has no quorum: the answer says so (nc would exit 0 here).
    wait_until("srvr answers", lambda: jvm_services.zk_mode(localhost, cfg.ports.zk_client) != "down", deadline=60)
    time.sleep(3)
    assert jvm_services.zk_mode(localhost, cfg.ports.zk_client) == "not serving"
    state = jvm_services.state("zookeeper")
    assert state.running and state.restarts == 0
    pid = state.pid
    assert pid is not None
    jvm_services.stop("zookeeper", timeout=30)
    assert not group_alive(pid)


def test_broker_probe_is_unavailable_when_zookeeper_is_down(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cannot tell if broker 2 is registered"):
        ProcessServices(AgentPaths(root=tmp_path)).broker_registration(f"127.0.0.1:{port}", 2)
    assert time.monotonic() - started < 10


@pytest.mark.rehearsal
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace")
def test_a_server_of_another_instance_is_never_adopted(tmp_path: Path) -> None:
    """Rehearsal instances share the machine's pids: a recorded pid may now be another instance's ZooKeeper."""
    ns = f"kasg-t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    other: subprocess.Popen[bytes] | None = None
    try:
        argv = ["ip", "netns", "exec", ns, "python3", "-c", "import time; time.sleep(60)", MAIN_CLASSES["zookeeper"]]
        other = subprocess.Popen(argv)
        pid = other.pid
        wait_until("exec", lambda: MAIN_CLASSES["zookeeper"] in Path(f"/proc/{pid}/cmdline").read_text(), deadline=10)
        paths = AgentPaths(root=tmp_path)
        paths.state_dir.mkdir(parents=True)
        (paths.state_dir / "zookeeper.pid").write_text(f"{pid}\n")
        services = ProcessServices(paths)
        assert services.state("zookeeper").running is False
        services.stop("zookeeper", timeout=1)
        assert other.poll() is None  # not signalled
    finally:
        if other is not None:
            other.kill()
            other.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
