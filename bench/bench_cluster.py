"""Benchmark the whole rehearsal (issue 4): run as root, ``.venv/bin/python bench/bench_cluster.py``.

Measures, on a cold local region with real ZooKeeper and Kafka:

1. ``up --local`` wall time by phase (region, artifacts, provision, cluster serving, verify);
2. total RSS of the 3-node rehearsal (every process in the instance namespaces, the bastion, the daemon);
3. replacements, three of them (``local kill`` of slots 2, 1, 3; medians reported): kill → every slot serving
   again, and the part of it spent waiting for EC2 to release the old instance's ENI and volumes (the region's
   ``detach_delay``);
4. boot overhead on each replacement: (instance running, i.e. its user data started → member healthy, minus the
   two waits the agent cannot hurry, each from its first sighting to the moment it ended: EC2 releasing the old
   holder's ENI, from the region's log; ZooKeeper expiring the old broker's session, from the ZooKeeper leader's
   log) divided by (the same JVMs started by hand on the already-rendered config, in the same namespace, until
   ZooKeeper is in the quorum and Kafka logs "Registered broker"); and the agent's own work: its CPU seconds
   until healthy (itself and the commands it ran), and its wall time from the claim to starting ZooKeeper;
5. clean boots (slots 2, 1, 3): the holder stopped gracefully and terminated, the new instance launched once EC2
   has released the slot, so nothing is subtracted: instance running → member healthy ÷ the same JVMs by hand;
   and where the machine's CPU went meanwhile (from /proc: the new node's JVMs, its agent, the local AWS API,
   the other instances), against the CPU the same JVMs use by hand.

A boot is watched through files on this machine (the region's log, the instance's log under its overlay's upper
dir), never by polling `kafka-asg status`, which would load the cores the boot being measured runs on.

Results go to bench/results/cluster.json and a markdown table on stdout. Leaves the machine clean (down --local).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

from kafka_asg.config import load_config
from kafka_asg.local.commands import make_hosts, region_clients, region_info
from kafka_asg.paths import RegionPaths

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cluster.json"
CLI = [sys.executable, "-m", "kafka_asg.cli"]
CLEAN_BOOT_SLOTS = (2, 1, 3, 2, 1, 3)
CLUSTER = load_config(None, local=True)  # the seed's cluster, as `up --local` provisions it
LOG_TIME = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]? ")  # ours, and Kafka's log4j


def cli(*args: str, timeout: float = 1200) -> str:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"kafka-asg {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def status() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(cli("status", "--local", "--json"))
    return rows


def serving() -> bool:
    slots = [r for r in status() if r["slot"] is not None]
    return len(slots) == 3 and all(r["serving"] for r in slots)


def holder(slot: int) -> str:
    return next(str(r["instance"]) for r in status() if r["slot"] == slot)


def slot_facts(slot: int) -> tuple[str, str, str, str]:
    """(holder, fixed IP, AZ) of ``slot``, and another slot's fixed IP."""
    rows = status()
    old, ip, az = next((str(r["instance"]), str(r["ip"]), str(r["az"])) for r in rows if r["slot"] == slot)
    other = next(str(r["ip"]) for r in rows if r["slot"] not in (None, slot))
    return old, ip, az, other


def region_log_size() -> int:
    return (RegionPaths.default().root / "region.log").stat().st_size


def wait_for_new_holder(
    az: str, region_log_from: int, timeout: float = 300, on_user_data: Callable[[], None] | None = None
) -> str:
    """The instance the ASG launches in ``az`` (the region logs it after ``region_log_from``), once its agent
    says serving. Watched by reading the region's log and the instance's log file from its overlay's upper dir on
    this machine: `kafka-asg status` polls (a Python process with boto3, and work for the daemon, twice a second)
    would load the 2 cores while the boot being measured runs."""
    paths = RegionPaths.default()
    deadline = time.monotonic() + timeout
    launched = re.compile(rf"launched (i-[0-9a-f]+) in {re.escape(az)}")
    instance = None
    while time.monotonic() < deadline:
        if instance is None or on_user_data is not None:
            with (paths.root / "region.log").open("rb") as fh:
                fh.seek(region_log_from)
                text = fh.read().decode(errors="replace")
            match = launched.search(text)
            instance = match.group(1) if match else None
            if instance is not None and on_user_data is not None and f"{instance}: user data started" in text:
                on_user_data()  # once, within 0.1 s of the region starting its user data
                on_user_data = None
        if instance is not None:
            log = paths.instance_dir(instance) / "upper" / "var" / "log" / "kafka-asg" / "agent.log"
            if log.exists() and "state booting -> serving" in log.read_text(errors="replace"):
                return instance
        time.sleep(0.1)
    raise SystemExit(f"no instance launched in {az} reached serving in {timeout} s (launched: {instance})")


def in_instance(instance: str, script: str, timeout: float = 300) -> str:
    done = make_hosts(RegionPaths.default()).exec_in(instance, ["sh", "-c", script], timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{instance}: {script!r} failed: {done.stderr.decode()[-2000:]}")
    return done.stdout.decode()


def rss_kib(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rehearsal_rss_mib(bastion: str, daemon_pid: int) -> dict[str, float]:
    per_ns: dict[str, float] = {}
    for name in [*instance_namespaces(), bastion]:
        per_ns[name] = sum(rss_kib(str(p)) for p in instance_processes(name)) / 1024
    per_ns["daemon"] = rss_kib(str(daemon_pid)) / 1024
    per_ns["total"] = sum(per_ns.values())
    return {k: round(v, 1) for k, v in per_ns.items()}


def log_times(text: str, pattern: str) -> list[float]:
    out = []
    for line in text.splitlines():
        match = LOG_TIME.match(line)
        if match and re.search(pattern, line):
            out.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def agent_timeline(instance: str, old: str) -> dict[str, float]:
    """From the region's, the instance's and the brokers' own logs: the instance running (its user data started),
    the two waits the agent cannot hurry, the claim, ZooKeeper started, the first serving cycle, and the agent's
    CPU time by then."""
    region_log = (RegionPaths.default().root / "region.log").read_text()
    # The region starts the user data the moment the instance's namespace is up: "instance running".
    user_data = log_times(region_log, rf"instance {instance}: user data started")
    log = in_instance(instance, "cat /var/log/kafka-asg/agent.log")
    waits = log_times(log, r"waiting for eni-.* holder .* is (shutting-down|terminated|stopping)")
    claimed = log_times(log, r"claimed eni-")
    zk = log_times(log, r"starting zookeeper")
    kafka = log_times(log, r"loop: starting kafka \(broker")
    healthy = log_times(log, r"no action: zookeeper (leader|follower), broker \d+ registered")
    # The agent logs its CPU (all threads) when it turns serving, and that of the children it reaped (the
    # commands it ran: mkfs, mount, blkid, ip; and a server that exited, if one did).
    cpu = re.search(r"state booting -> serving after .* its CPU so far (\d+\.\d+)s, reaped children (\d+\.\d+)s", log)
    assert user_data and claimed and zk and kafka and healthy and cpu, log[-3000:]
    leftover = log_times(log, r"waiting: /brokers/ids/\d+ still holds a previous broker")
    # The waits on what the agent cannot hurry, from its first sighting to the moment the thing happened:
    # EC2 (the region) releasing the old holder's ENI and volumes; ZooKeeper expiring the old broker's session
    # (the ZooKeeper leader logs it). Noticing either late is the agent's time.
    released = log_times(region_log, rf"{old} terminated; its surviving ENIs and volumes are available")
    claim_wait = max(0.0, released[-1] - waits[0]) if waits and released else 0.0
    session_wait = 0.0
    if leftover:
        expired = [t for t in session_expiries() if leftover[0] <= t <= kafka[0]]
        session_wait = (expired[-1] if expired else leftover[-1]) - leftover[0]
    return {
        "user_data_to_healthy_s": round(healthy[0] - user_data[0], 2),
        "claim_wait_s": round(claim_wait, 2),
        "old_session_wait_s": round(session_wait, 2),
        "claimed_to_zookeeper_started_s": round(zk[0] - claimed[0], 2),
        "agent_cpu_s": float(cpu.group(1)),
        "agent_children_cpu_s": float(cpu.group(2)),
    }


def session_expiries() -> list[float]:
    """When the ZooKeeper leader (any slot holder's server) expired a session: the last one before the new Kafka
    started is the old broker's (its 18 s timeout outlasts the old agent's kazoo session)."""
    times: list[float] = []
    for row in status():
        if row["slot"] is not None:
            text = in_instance(str(row["instance"]), "cat /var/log/kafka-asg/zookeeper/*.log 2>/dev/null || true")
            times.extend(log_times(text, r"Expiring session 0x[0-9a-f]+, timeout of"))
    return sorted(times)


DIRECT = r"""
set -e
IP={ip}; ID={slot}
ZK=$(ls -d /opt/kafka-asg/apache-zookeeper-*/ | head -1); K=$(ls -d /opt/kafka-asg/kafka_2.13-*/ | head -1)
mkdir -p /var/log/kafka-asg/bench
# A broker stopped while still starting halts without closing its ZooKeeper session: its /brokers/ids node
# lingers for the session timeout, and a new broker with that id would fail with NodeExists. Not timed.
until "$ZK/bin/zkCli.sh" -server {other}:2181 stat /brokers/ids/$ID 2>&1 | grep -q "does not exist"; do sleep 1; done
t0=$(date +%s.%N)
JVMFLAGS=-Xmx256m ZOO_LOG_DIR=/var/log/kafka-asg/bench setsid "$ZK/bin/zkServer.sh" start-foreground \
  /etc/kafka-asg/zoo.cfg >/var/log/kafka-asg/bench/zk.out 2>&1 </dev/null &
until printf srvr | nc -w 1 $IP 2181 2>/dev/null | grep -qE 'Mode: (leader|follower)'; do sleep 0.1; done
t1=$(date +%s.%N)
KAFKA_HEAP_OPTS='-Xmx512m -Xms512m' LOG_DIR=/var/log/kafka-asg/bench setsid "$K/bin/kafka-server-start.sh" \
  /etc/kafka-asg/server.properties >/var/log/kafka-asg/bench/kafka.out 2>&1 </dev/null &
# Registered: Kafka's own log line, the moment the agent's watch reports (a client's metadata poll would add
# its own retry backoff to the measure).
until grep -q "Registered broker $ID at path" /var/log/kafka-asg/bench/server.log 2>/dev/null; do sleep 0.1; done
echo $t0 $t1
grep -h "Registered broker $ID at path" /var/log/kafka-asg/bench/server.log | tail -1
"""


HZ = os.sysconf("SC_CLK_TCK")


def process_ticks() -> dict[int, int]:
    """Each process's CPU ticks: its own and those of the children it reaped (user + system)."""
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks[int(entry)] = sum(int(f) for f in fields[11:15])
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(busy, all) ticks of every core since boot, from /proc/stat (idle and iowait are not busy)."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def boot_cpu(before: tuple[tuple[int, int], dict[int, int]], instance: str) -> dict[str, float]:
    """Where the machine's CPU went between ``before`` and now, in core-seconds: the new node's JVMs, its agent
    (with the commands it ran; the user data's own short-lived commands are missed), the region's daemon (the
    local AWS API), the other instances, the rest (this benchmark, the kernel)."""
    (busy0, all0), ticks0 = before
    busy1, all1 = machine_ticks()
    ticks1 = process_ticks()
    info = region_info()
    assert info is not None

    def used(pids: Iterable[int]) -> float:
        return sum(ticks1.get(p, 0) - ticks0.get(p, 0) for p in pids if p in ticks1) / HZ

    node = instance_processes(instance)
    others = {p for name in instance_namespaces() if name != instance for p in instance_processes(name)}
    out = {
        "window_core_s": round((all1 - all0) / HZ, 2),
        "busy_core_s": round((busy1 - busy0) / HZ, 2),
        "node_jvms_core_s": round(used(p for p, cmd in node.items() if is_jvm(cmd)), 2),
        "node_agent_core_s": round(used(p for p, cmd in node.items() if not is_jvm(cmd)), 2),
        "daemon_core_s": round(used([info.pid]), 2),
        "other_instances_core_s": round(used(others), 2),
    }
    out["rest_core_s"] = round(
        out["busy_core_s"] - sum(v for k, v in out.items() if k.startswith(("node", "daemon", "other"))), 2
    )
    return out


def is_jvm(cmdline: str) -> bool:
    return Path(cmdline.split(maxsplit=1)[0]).name == "java" if cmdline else False


def instance_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith("i-")]


def instance_processes(instance: str) -> dict[int, str]:
    """pid -> command line of every process in the instance (or the bastion), by its network namespace: the
    instances share this machine's PID namespace, so a `pkill` inside one would reach the others. Empty once the
    namespace is gone (a terminated instance's, torn down while a boot is measured)."""
    pids = subprocess.run(["ip", "netns", "pids", instance], capture_output=True, text=True, check=False).stdout
    out: dict[int, str] = {}
    for pid in pids.split():
        try:
            out[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return out


def stop_by_pid(instance: str, marker: str, sig: int, timeout: float = 120) -> None:
    targets = [pid for pid, cmd in instance_processes(instance).items() if marker in cmd]
    for pid in targets:
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in targets) and time.monotonic() < deadline:
        time.sleep(0.2)


def direct_jvm_seconds(instance: str, ip: str, slot: int, other: str) -> dict[str, float]:
    """Stop the agent and its servers (Kafka first, with its controlled shutdown), then start the same JVMs
    by hand on the rendered config."""
    stop_by_pid(instance, "kafka-asg-agent.pyz", signal.SIGKILL)  # the restart loop and the agent
    stop_by_pid(instance, "kafka.Kafka", signal.SIGTERM)
    stop_by_pid(instance, "QuorumPeerMain", signal.SIGTERM)
    times, registered = in_instance(instance, DIRECT.format(ip=ip, slot=slot, other=other)).strip().splitlines()
    t0, t1 = (float(x) for x in times.split())
    (t2,) = log_times(registered, "Registered broker")
    # Their CPU from start to just after the registration (the script ends then; JVMs are never reaped children).
    ticks = process_ticks()
    jvms = [p for p, cmd in instance_processes(instance).items() if is_jvm(cmd) and "/bench" in cmd]
    return {
        "zookeeper_in_quorum_s": round(t1 - t0, 2),
        "member_healthy_s": round(t2 - t0, 2),
        "jvms_core_s": round(sum(ticks.get(p, 0) for p in jvms) / HZ, 2),
    }


def main() -> int:
    cli("down", "--local", timeout=600)  # a cold start: no region, no volumes
    start = time.monotonic()
    cli("up", "--local")
    up_total = time.monotonic() - start
    phases = json.loads((RegionPaths.default().root / "up-timings.json").read_text())
    info = region_info()
    assert info is not None
    rss = rehearsal_rss_mib(info.bastion, info.pid)

    rounds = [replace(slot) for slot in (2, 1, 3)]
    # Two rounds: a single boot's ratio moves by ±0.05 with what else the two cores do at that moment.
    boots = [clean_boot(slot) for slot in CLEAN_BOOT_SLOTS]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "up_local_cold_total_s": round(up_total, 1),
        "up_local_phases_s": phases,
        "rehearsal_rss_mib": rss,
        "replacements": rounds,
        "median": {key: round(median(r[key] for r in rounds), 3) for key in rounds[0] if key != "slot"},
        "clean_boots": boots,
        "clean_boot_median": {key: round(median(r[key] for r in boots), 3) for key in boots[0] if key != "slot"},
    }
    cli("down", "--local", timeout=600)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print()
    m = results["median"]
    print("| measure | result | target |")
    print("|---|---:|---:|")
    print(f"| `up --local`, cold, total | {results['up_local_cold_total_s']} s | |")
    for name, seconds in phases.items():
        print(f"| &nbsp;&nbsp;phase: {name} | {seconds} s | |")
    print(f"| total RSS of the 3-node rehearsal | {rss['total']} MiB | ≤ 4096 MiB |")
    print("| *replacements (`local kill` of slots 2, 1, 3; medians)* | | |")
    print(f"| kill → all slots serving | {m['kill_to_serving_s']} s | |")
    print(f"| &nbsp;&nbsp;of which waiting for EC2 to release the old holder's ENI | {m['claim_wait_s']} s | |")
    session = m["old_session_wait_s"]
    print(f"| &nbsp;&nbsp;of which waiting for ZooKeeper to expire the old broker's session | {session} s | |")
    print(f"| agent boot: instance running → member healthy, minus both waits | {m['agent_boot_s']} s | |")
    print(f"| the same JVMs by hand on the rendered config | {m['direct_member_healthy_s']} s | |")
    print(f"| boot overhead (agent boot ÷ JVMs by hand) | {m['boot_overhead_ratio']} | ≤ 1.15 |")
    print(f"| agent CPU until healthy | {m['agent_cpu_s']} s | ≤ 1 s |")
    print(f"| &nbsp;&nbsp;plus the commands it ran (mkfs, mount, blkid, ip) | {m['agent_children_cpu_s']} s | |")
    print(f"| agent: slot claimed → ZooKeeper started | {m['claimed_to_zookeeper_started_s']} s | |")
    b = results["clean_boot_median"]
    print("| *clean boots (holder stopped and terminated, then the ASG launches; slots 2, 1, 3 twice; medians)* | | |")
    print(f"| instance running → member healthy | {b['user_data_to_healthy_s']} s | |")
    print(f"| the same JVMs by hand on the rendered config | {b['direct_member_healthy_s']} s | |")
    print(f"| boot overhead (instance running → healthy ÷ JVMs by hand) | {b['boot_overhead_ratio']} | ≤ 1.15 |")
    print(f"| agent CPU until healthy | {b['agent_cpu_s']} s | ≤ 1 s |")
    busy = f"{b['cpu_busy_core_s']} of {b['cpu_window_core_s']} core-s"
    print(f"| machine CPU busy, user data started → serving | {busy} | |")
    print(f"| &nbsp;&nbsp;the new node's JVMs | {b['cpu_node_jvms_core_s']} core-s | |")
    agent = b["cpu_node_agent_core_s"]
    print(f"| &nbsp;&nbsp;the new node's agent and user data (with the commands they ran) | {agent} core-s | |")
    print(f"| &nbsp;&nbsp;the region's daemon (local AWS API, instance launch) | {b['cpu_daemon_core_s']} core-s | |")
    print(f"| &nbsp;&nbsp;the other instances | {b['cpu_other_instances_core_s']} core-s | |")
    print(f"| the same JVMs by hand: CPU until registered | {b['direct_jvms_core_s']} core-s | |")
    return 0


def replace(slot: int) -> dict[str, float]:
    """``local kill <slot>``, wait for the replacement to serve, then time the same JVMs by hand on it."""
    old, ip, az, other = slot_facts(slot)
    log_from = region_log_size()
    killed = time.monotonic()
    cli("local", "kill", str(slot))
    new = wait_for_new_holder(az, log_from)
    while not serving():
        time.sleep(0.5)
    kill_to_serving = time.monotonic() - killed
    assert holder(slot) == new, (holder(slot), new)
    timeline = agent_timeline(new, old)
    direct = direct_jvm_seconds(new, ip, slot, other)
    agent_boot = timeline["user_data_to_healthy_s"] - timeline["claim_wait_s"] - timeline["old_session_wait_s"]
    return {
        "slot": slot,
        "kill_to_serving_s": round(kill_to_serving, 1),
        **timeline,
        "agent_boot_s": round(agent_boot, 2),
        "direct_zookeeper_in_quorum_s": direct["zookeeper_in_quorum_s"],
        "direct_member_healthy_s": direct["member_healthy_s"],
        "boot_overhead_ratio": round(agent_boot / direct["member_healthy_s"], 2),
    }


def autoscaling() -> Any:
    info = region_info()
    assert info is not None
    return region_clients(info)[1]


def clean_boot(slot: int) -> dict[str, float]:
    """The issue's measure as it stands, with nothing to wait for: the holder's agent is stopped (SIGTERM:
    Kafka's controlled shutdown closes its ZooKeeper session, so no registration lingers), its instance
    terminated with the desired capacity decremented, and once EC2 has released the slot's ENI and volumes the
    desired capacity goes back up: the ASG's new instance boots into a free slot. Instance running (its user
    data started) → member healthy, divided by the same JVMs by hand on it."""
    old, ip, az, other = slot_facts(slot)
    stop_by_pid(old, "while :", signal.SIGKILL)  # the rehearsal's restart loop, else it starts the agent again
    stop_by_pid(old, "kafka-asg-agent.pyz", signal.SIGTERM)
    # After a replacement round the servers are the ones started by hand, not the agent's: stop them the same way.
    stop_by_pid(old, "kafka.Kafka", signal.SIGTERM)
    stop_by_pid(old, "QuorumPeerMain", signal.SIGTERM)
    asg = autoscaling()
    asg.terminate_instance_in_auto_scaling_group(InstanceId=old, ShouldDecrementDesiredCapacity=True)
    region_log = RegionPaths.default().root / "region.log"
    while f"{old} terminated; its surviving ENIs" not in region_log.read_text():
        time.sleep(0.2)
    log_from = region_log_size()
    snapshots: list[tuple[tuple[int, int], dict[int, int]]] = []
    asg.set_desired_capacity(AutoScalingGroupName=CLUSTER.asg_name, DesiredCapacity=3)
    new = wait_for_new_holder(az, log_from, on_user_data=lambda: snapshots.append((machine_ticks(), process_ticks())))
    cpu = boot_cpu(snapshots[0], new)  # user data started → the agent's "serving", each seen within 0.1 s
    while not serving():
        time.sleep(0.5)
    assert holder(slot) == new, (holder(slot), new)
    log = in_instance(new, "cat /var/log/kafka-asg/agent.log")
    assert "waiting for eni-" not in log and "still holds a previous broker" not in log, log[-3000:]
    timeline = agent_timeline(new, old)
    direct = direct_jvm_seconds(new, ip, slot, other)
    return {
        "slot": slot,
        "user_data_to_healthy_s": timeline["user_data_to_healthy_s"],
        "claimed_to_zookeeper_started_s": timeline["claimed_to_zookeeper_started_s"],
        "agent_cpu_s": timeline["agent_cpu_s"],
        "direct_zookeeper_in_quorum_s": direct["zookeeper_in_quorum_s"],
        "direct_member_healthy_s": direct["member_healthy_s"],
        "boot_overhead_ratio": round(timeline["user_data_to_healthy_s"] / direct["member_healthy_s"], 2),
        "direct_jvms_core_s": direct["jvms_core_s"],
        **{f"cpu_{k}": v for k, v in cpu.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
