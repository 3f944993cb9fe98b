"""The node agent's loop: observe -> decide -> execute, one sentence per cycle (Patroni's ``run_cycle``).

All side effects of the agent happen in :meth:`Agent._execute`, through the interfaces in
:mod:`kafka_asg.agent.ports`; :func:`~kafka_asg.agent.decide.decide` is pure. Errors are mapped by category
(:mod:`kafka_asg.errors`) to "try again next cycle": the loop never dies on a transient failure, and it
never starts a server on a partial picture (observation fails -> nothing is decided).

Step frequencies follow cloud-init: scale-in protection is once per instance (a semaphore file keyed by
instance id under ``AgentPaths.semaphores_dir``); install and render run once per agent process (cheap and
idempotent: the unpack is once per version, the writes are atomic); everything else is re-checked every cycle.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any, Protocol

from kafka_asg.agent import render
from kafka_asg.agent.concurrency import at_once, lower_thread_priority, results_at_once
from kafka_asg.agent.decide import (
    Action,
    AttachVolumes,
    ClaimEni,
    ConfigureNic,
    Fence,
    Halt,
    InitVolume,
    Install,
    MakeFilesystem,
    Mount,
    NoAction,
    NodeState,
    Pace,
    ProtectFromScaleIn,
    RecordKafkaClusterId,
    Refuse,
    Render,
    StartServer,
    decide,
)
from kafka_asg.agent.ports import Cloud, Host, Imds, InstanceIdentity, ServerName, Services
from kafka_asg.agent.reads import ALL_READS, READS_MAX_AGE, VOLUME_READS, ReadKind, RecentReads
from kafka_asg.agent.snapshot import MARKER_NAME, SERVER_NAMES, Memory, NodeView, observe, remember
from kafka_asg.agent.status import Status, write_status
from kafka_asg.config import ClusterConfig, VolumeRole
from kafka_asg.errors import (
    ClaimLost,
    CloudError,
    HostError,
    IdentityMismatch,
    KafkaAsgError,
    NotFoundError,
    ServiceError,
    Unavailable,
)
from kafka_asg.fsutil import atomic_write, read_properties, sha256_file
from kafka_asg.paths import AgentPaths

logger = logging.getLogger(__name__)

TAG_PREFIX = "kafka-asg:"
MAX_TAG_VALUE = 255  # EC2 tag values are at most 256 Unicode characters
PROTECT_STEP = "scale-in-protection"  # a per-instance step (semaphore)
# Waits on this node's own devices and servers, and on ZooKeeper (its own broker's registration, a dead broker's
# session): EC2 reads are reused across them (reads.py). Not across a wait on EC2 or another instance ("boot"), nor
# from one serving cycle to the next ("idle": each one reads EC2 afresh, the fencing heartbeat).
OWN_PACES: frozenset[Pace] = frozenset({"device", "soon", "watched"})
MAX_CHAINED_CYCLES = 50  # boot steps run back to back at most this many times before a pause
# Steps after which EC2 reads must be read afresh, because they change them: a fence everything (slot ENIs,
# volumes, holders), a claim the volumes (the slot's ENIs it reads back at once), attaching volumes the volumes.
STALE_READS: Mapping[type[Action], tuple[ReadKind, ...]] = {
    ClaimEni: VOLUME_READS,  # and the ENIs, but the claim reads them back itself
    Fence: ALL_READS,
    AttachVolumes: VOLUME_READS,
}


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def cpu(self) -> tuple[float, float]: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds (getrusage(2)) of this process (all threads), and of the children it reaped: the
        commands it ran (mkfs, mount, blkid, ip) and any server that exited."""
        own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime


@dataclass(frozen=True)
class AgentSettings:
    """Timings of the loop. ``booting_interval`` is short so a boot is not slowed by the loop itself."""

    # Twice a second: noticing the old holder's ENI released is boot time (2 EC2 Describe calls per look, well
    # inside EC2's request-rate budget: https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html).
    booting_interval: float = 0.5
    soon_interval: float = 0.2  # a wait on this node's own servers (pace "soon")
    # A wait for a NIC or volume it attached to show up (pace "device"): every 50 ms for the first second (the
    # rehearsal plugs a device within ~0.1 s of the attach call), then at the soon pace (EBS on Nitro: seconds).
    device_interval: float = 0.05
    device_fast_seconds: float = 1.0
    device_look_interval: float = 0.005  # ... and meanwhile a look at the awaited volumes' device links (a stat)
    # EC2, IMDS lifecycle, NIC and blkid reads reused across waits on its own devices and servers (reads.py)
    reads_max_age: float = READS_MAX_AGE
    watched_interval: float = 2.0  # a wait a ZooKeeper watch ends (pace "watched"): the poll is the fallback
    serving_interval: float = 5.0  # also standby and refused
    heartbeat_seconds: float = 60.0  # report() at least this often, even when nothing changed
    report_min_interval: float = 10.0  # a changed sentence alone is reported at most this often
    kafka_stop_timeout: float = 120.0  # controlled shutdown moves leadership away first
    zookeeper_stop_timeout: float = 30.0


@dataclass(frozen=True)
class Outcome:
    """What executing an action came to, when that differs from the decision's sentence."""

    sentence: str
    progressed: bool  # a step was done (the next cycle may run at once), not a wait or a lost race


class Prefetch:
    """``step(name)`` for each of ``names`` in turn, in a background thread; :meth:`result` waits for one name
    and re-raises the error that stopped the thread.

    The install (download, sha256, unpack) needs no slot, so the daemon starts it in the first cycle, once the
    warm-pool state is known: it then overlaps the claim, the wait for a dying holder, the attaches and the mounts
    instead of following them; and ZooKeeper, installed first, starts while Kafka's archive is unpacked. Decisions stay
    in the loop: the Install step calls :meth:`result`. After an error (or without a start, as in the unit
    tests' ``run_cycle``) :meth:`result` runs the step inline. A ``held`` name's step runs at a background thread
    priority (:meth:`background`) and waits in :meth:`hold` (before its unpack) until :meth:`release`, or until the
    loop asks for its result.
    """

    def __init__(
        self, step: Callable[[ServerName], None], names: Sequence[ServerName], held: Sequence[ServerName] = ()
    ) -> None:
        self._step = step
        self._names = tuple(names)
        self._held = frozenset(held)
        self._released = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: set[ServerName] = set()
        self._changed = threading.Condition()

    def start(self) -> None:
        if self._thread is None and len(self._done) < len(self._names):
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for name in self._names:
            if name in self._done:
                continue
            try:
                self._step(name)
            except BaseException as exc:  # handed to the loop's thread by result()
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                return
            with self._changed:
                self._done.add(name)
                self._changed.notify_all()

    def hold(self, name: ServerName) -> None:
        """Called by the step before its unpack: a held name waits for :meth:`release`."""
        if name in self._held:
            self._released.wait()

    def background(self, name: ServerName) -> None:
        """Called by the step before its download: a held name's work (download, hash, unpack) goes on at a lower
        CPU priority (this thread only). It overlaps the boot steps and ZooKeeper's start, which the boot waits
        for; Kafka is needed only once ZooKeeper serves."""
        if name in self._held and threading.current_thread() is self._thread:
            lower_thread_priority()

    def release(self) -> None:
        self._released.set()

    def finished(self) -> frozenset[ServerName]:
        """The names whose step the thread has done."""
        with self._changed:
            return frozenset(self._done)

    def result(self, name: ServerName) -> None:
        if name in self._held:  # the loop needs it now
            self.release()
        thread = self._thread
        if thread is not None and name not in self._done:
            with self._changed:
                self._changed.wait_for(lambda: name in self._done or self._error is not None or not thread.is_alive())
            if name not in self._done:  # the thread stopped before it: hand its error over, once
                thread.join()
                self._thread, error, self._error = None, self._error, None
                if error is not None:
                    raise error
        if name not in self._done:
            self._step(name)
            self._done.add(name)


class Semaphores:
    """cloud-init's ``FileSemaphores`` for ``PER_INSTANCE`` steps: a marker file named by step and instance id,
    so an image baked from a used instance, or a replacement, runs the step again."""

    def __init__(self, directory: Path, instance_id: str) -> None:
        self.directory = directory
        self.instance_id = instance_id

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.{self.instance_id}"

    def has_run(self, name: str) -> bool:
        return self._path(name).exists()

    def mark(self, name: str) -> None:
        # No fsync: after a power loss the step runs again (the scale-in protection is idempotent).
        atomic_write(self._path(name), f"{datetime.now(UTC).isoformat()}\n", durable=False)

    def clear(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)


class Agent:
    """One node's agent. ``run_cycle`` is the unit the tests drive; ``run_forever`` is the daemon.

    :param cfg: the cluster config (from ``cluster.json``; its base config paths are local files).
    :param imds, cloud, host, services: the side-effect interfaces (real ones or ``agent/fakes.py``).
    :param paths: every local path of the agent.
    :param clock: monotonic + wall clock + sleep (``FakeClock`` in tests).
    """

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        imds: Imds,
        cloud: Cloud,
        host: Host,
        services: Services,
        paths: AgentPaths,
        clock: Clock | None = None,
        settings: AgentSettings | None = None,
        manifest: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        # manifest.json as the agent's start read it with the cluster's inputs (None: read from the bucket): one
        # round trip fewer before ZooKeeper's archive; read afresh after a failed install.
        self.manifest = manifest
        self.imds = imds
        self.cloud = cloud
        self.host = host
        self.services = services
        self.paths = paths
        self.clock: Clock = clock or SystemClock()
        self.settings = settings or AgentSettings()
        self.zk_base = cfg.zookeeper_config.read_text()
        self.kafka_base = cfg.kafka_config.read_text()
        self.mountpoints: Mapping[VolumeRole, PurePosixPath] = render.data_dirs(
            read_properties(self.zk_base), read_properties(self.kafka_base)
        )
        self.memory = Memory()
        self.identity: InstanceIdentity | None = None
        self.state: NodeState = "booting"
        self.halted = False
        self.progressed = False  # the last cycle executed a step (boot progress) rather than waiting
        self.stale_reads: tuple[ReadKind, ...] = ()  # ... and the EC2 reads that step changed (STALE_READS)
        self.pace: Pace = "boot"  # how soon the last cycle's decision wants to look again
        self._device_wait_since: float | None = None  # when the current run of "device" waits began
        self.cycle = 0
        self.last_view: NodeView | None = None
        self._started_at = self.clock.time()
        self._state_since = self._started_at
        self._reported: dict[str, str] = {}
        self._reported_at: float | None = None
        self._tag_values: dict[str, str] = {}  # the last cycle's, for the next report
        self._stop = threading.Event()
        # Set by a stop request or by services.on_change (a ZooKeeper watch): ends the pause between cycles.
        self._wake = threading.Event()
        services.on_change(self._wake.set)
        self._last_bug: str | None = None
        # Kafka's archive (59 MB) is downloaded, hashed and unpacked in Python, at a background thread priority: the
        # download overlaps the boot steps; the unpack took the GIL from them, so it waits for the loop's first wait
        # on something other than a device it has just attached (ZooKeeper's start: it needs most of a second to
        # serve, and Kafka is not needed before that; or a device that takes more than a second to show up, as EBS
        # on AWS may).
        self.prefetch = Prefetch(self._download_and_unpack, SERVER_NAMES, held=("kafka",))
        self._prefetching = False
        self.reads = RecentReads(cloud, self.clock.monotonic, self.settings.reads_max_age)

    # ----------------------------------------------------------------------------------- cycle
    def run_cycle(self) -> str:
        """Observe, decide, execute; return the sentence that explains this cycle."""
        self.cycle += 1
        # EC2 reads are reused only across this node's own steps (mount, render, start) and its waits on its own
        # devices and servers; before any other wait, read afresh, and after its own claim or attach, what it changed.
        self.reads.forget(ALL_READS if not self.progressed and self.pace not in OWN_PACES else self.stale_reads)
        self.progressed, self.stale_reads = False, ()
        self.pace = "boot"
        # What the prefetch thread has installed meanwhile needs no Install step (a cycle) of its own.
        if ready := self.prefetch.finished() - self.memory.installed:
            self.memory = replace(self.memory, installed=self.memory.installed | ready)
        view: NodeView | None = None
        try:
            identity = self._identity()
            view = observe(
                cfg=self.cfg,
                identity=identity,
                imds=self.imds,
                cloud=self.reads,
                host=self.host,
                services=self.services,
                mountpoints=self.mountpoints,
                memory=self.memory,
                now=self.clock.monotonic(),
            )
            self.memory = remember(view)
            view = view.but(memory=self.memory)
            if self._prefetching and not view.is_warm_pool:
                # As soon as the warm-pool state is known: an instance headed for a warm pool installs nothing;
                # any other needs ZooKeeper's archive by the end of its boot steps, its claim among them.
                self.prefetch.start()
            decision = decide(view, self.cfg)
            outcome = self._execute(decision.action, view)
            state, self.pace = decision.state, decision.recheck
            if self.pace != "device":
                self._device_wait_since = None
            elif self._device_wait_since is None:
                self._device_wait_since = self.clock.monotonic()
            self.stale_reads = STALE_READS.get(type(decision.action), ())
            if outcome is None:
                sentence = decision.sentence
                # A step done (not a wait): the next cycle may run at once.
                self.progressed = not isinstance(decision.action, (NoAction, Refuse, Halt))
            else:
                sentence, self.progressed = outcome.sentence, outcome.progressed
        except Unavailable as exc:
            sentence, state = f"waiting: {exc}; retrying next cycle", self._unchanged_state()
        except IdentityMismatch as exc:
            sentence, state = f"refused: {exc}; not starting zookeeper or kafka", "refused"
        except (CloudError, HostError, ServiceError, NotFoundError) as exc:
            sentence, state = f"failed: {exc}; retrying next cycle", self._unchanged_state()
        except KafkaAsgError as exc:
            sentence, state = f"failed: {exc}; retrying next cycle", self._unchanged_state()
        except Exception as exc:
            sentence, state = f"failed: unexpected {type(exc).__name__}: {exc} (a BUG)", self._unchanged_state()
            if sentence != self._last_bug:  # the traceback once per distinct error, not once per second
                logger.exception("unexpected error in the agent's cycle; please report it as a BUG")
                self._last_bug = sentence
        self.last_view = view
        self._set_state(state)
        self._publish(sentence, view, report=False)
        logger.info("%s", sentence)  # the cycle's line, as soon as its status file says it
        # A boot step chains into the next at once: its tags wait for the first cycle that waits (a CreateTags
        # round trip, 10-20 ms, more on a busy API, between boot steps would only slow the boot), and not one of
        # the first second's 50 ms looks for a device (it would delay the next look).
        if not self.progressed and not self._fast_device_wait:
            self.report_tags()
        return sentence

    def _unchanged_state(self) -> NodeState:
        # A transient failure does not make a serving node booting; a standby stays standby.
        return self.state

    def _identity(self) -> InstanceIdentity:
        if self.identity is None:
            self.identity = self.imds.identity()
            if Semaphores(self.paths.semaphores_dir, self.identity.instance_id).has_run(PROTECT_STEP):
                logger.info("scale-in protection: already ran (freq=once-per-instance)")
                self.memory = replace(self.memory, protected=True)
        return self.identity

    def _set_state(self, state: NodeState) -> None:
        if state != self.state:
            now = self.clock.time()
            # The agent's own cost, measured where it matters (bench/bench_cluster.py reads this line).
            own, reaped = self.clock.cpu()
            logger.info(
                "state %s -> %s after %.2fs (agent started %.2fs ago, its CPU so far %.2fs, reaped children %.2fs)",
                self.state,
                state,
                now - self._state_since,
                now - self._started_at,
                own,
                reaped,
            )
            self._state_since = now
            self.state = state

    # --------------------------------------------------------------------------------- execute
    def _execute(self, action: Action, view: NodeView) -> Outcome | None:
        """Do what the decision says. Returns an :class:`Outcome` when it differs from the decision's sentence."""
        match action:
            case NoAction() | Refuse():
                return None
            case Halt():
                self.halted = True
                return None
            case ClaimEni():
                return self._claim_eni(action, view)
            case Fence():
                self._stop_servers()
                self.memory = replace(self.memory, claimed_slot=None, rendered=False, protected=False)
                self._unprotect(view)
                return None
            case ProtectFromScaleIn():
                self._protect(view)
                return None
            case AttachVolumes():
                return self._attach_volumes(action, view)
            case ConfigureNic():
                self.host.configure_nic(action.ifname, action.ip, action.subnet, action.table)
                return None
            case MakeFilesystem():
                self.host.make_filesystem(action.device, action.label)
                return None
            case Mount():
                self._mount(action)
                return None
            case InitVolume():
                self._init_volume(action)
                return None
            case Install():
                self.prefetch.result(action.name)
                self.memory = replace(self.memory, installed=self.memory.installed | {action.name})
                return None
            case Render():
                self._render(action.slot, view)
                return None
            case StartServer():
                self._start(action.name)
                return None
            case RecordKafkaClusterId():
                self.host.write_file(action.mountpoint / MARKER_NAME, action.marker.to_json())
                return None
        raise AssertionError(f"unhandled action {action!r}")  # pragma: no cover

    def _claim_eni(self, action: ClaimEni, view: NodeView) -> Outcome:
        me = view.instance_id
        what = f"{action.eni_id} (slot {action.slot}, {action.ip})"
        try:
            self.cloud.attach_eni(action.eni_id, me, action.device_index)
        except ClaimLost as exc:
            holder = exc.holder or self._holder_of(action.eni_id, view) or "another instance"
            if holder != me:
                return Outcome(f"lost the race for {what} to {holder}; re-checking next cycle", progressed=False)
            # InUse by us: an earlier attach of ours went through (e.g. its reply was lost and retried).
        # Read the attachment back: the attach call is the lock on EC2, but not on every emulator
        # (moto accepts a second attach), so "mine" is what describe says, never what attach returned.
        # Read afresh, and kept for the next cycle (boot steps follow at once, and this read is seconds fresh).
        self.reads.forget()
        enis = self.reads.slot_enis(self.cfg.name, view.identity.subnet_id)
        now_held = {e.eni_id: e.attached_to for e in enis}
        read_back = now_held.get(action.eni_id)
        if read_back != me:
            return Outcome(
                f"lost the race for {what}: after attaching, EC2 shows it attached to {read_back}", progressed=False
            )
        self.memory = replace(self.memory, claimed_slot=action.slot)
        return Outcome(f"claimed {what}", progressed=True)

    def _holder_of(self, eni_id: str, view: NodeView) -> str | None:
        """Best effort: who holds the ENI now (EC2's InUse error does not say)."""
        try:
            enis = self.cloud.slot_enis(self.cfg.name, view.identity.subnet_id)
        except KafkaAsgError:
            return None
        return next((e.attached_to for e in enis if e.eni_id == eni_id), None)

    def _protect(self, view: NodeView) -> None:
        self.cloud.set_scale_in_protection(self.cfg.asg_name, view.instance_id, True)
        Semaphores(self.paths.semaphores_dir, view.instance_id).mark(PROTECT_STEP)
        self.memory = replace(self.memory, protected=True)

    def _unprotect(self, view: NodeView) -> None:
        sem = Semaphores(self.paths.semaphores_dir, view.instance_id)
        if sem.has_run(PROTECT_STEP):
            # Without a slot this instance is surplus: a scale-in should be able to pick it.
            self.cloud.set_scale_in_protection(self.cfg.asg_name, view.instance_id, False)
            sem.clear(PROTECT_STEP)

    def _attach_volumes(self, action: AttachVolumes, view: NodeView) -> Outcome | None:
        """All at once: each attach is its own lock, and one after another they were three round trips (80 ms
        on a busy API) of every boot. The first failure, in the action's order, is this step's."""
        calls: dict[str, Callable[[], object]] = {
            volume_id: partial(self.cloud.attach_volume, volume_id, view.instance_id, device)
            for volume_id, device in action.attachments
        }
        if action.protect:
            calls[PROTECT_STEP] = partial(self._protect, view)
        failures = at_once(calls)
        for volume_id, _ in action.attachments:
            failure = failures.get(volume_id)
            if isinstance(failure, ClaimLost):
                # Keep what we attached (the slot's ENI is ours): report and retry, never start without all 3.
                return Outcome(
                    f"waiting: {volume_id} was attached by {failure.holder or 'another instance'} first; "
                    f"keeping the slot, retrying next cycle",
                    progressed=False,
                )
            if failure is not None:
                raise failure
        if PROTECT_STEP in failures:
            raise failures[PROTECT_STEP]
        return None

    def _mount(self, action: Mount) -> None:
        """Outer mountpoints first (an inner one's directory is made on the volume mounted above it), those at one
        depth side by side: a mount(2) reads the filesystem's superblock and journal from a volume just attached,
        5-10 ms each on a busy boot."""
        for depth in sorted({len(m.mountpoint.parts) for m in action.mounts}):
            level = [m for m in action.mounts if len(m.mountpoint.parts) == depth]
            results_at_once(
                {str(m.mountpoint): partial(self.host.mount, m.device, m.mountpoint, m.filesystem) for m in level}
            )

    def _init_volume(self, action: InitVolume) -> None:
        # lost+found first: the marker ends this step, so a failure here is retried next cycle.
        if action.role == "kafka-log":
            lost_found = action.mountpoint / "lost+found"
            self.host.remove_empty_dir(lost_found)
        self.host.write_file(action.mountpoint / MARKER_NAME, action.marker.to_json())

    def _download_and_unpack(self, name: ServerName) -> None:
        """Download the server's archive unless already here, check its sha256 (and the base configs') against
        manifest.json, unpack.

        Runs in the prefetch thread: touches only the bucket, the downloads and the install dirs, never
        the loop's memory."""
        try:
            self._install(name)
        except BaseException:
            self.manifest = None  # the next try reads the bucket's: `kafka-asg up` may have changed it meanwhile
            raise

    def _install(self, name: ServerName) -> None:
        raw = self.manifest if self.manifest is not None else self.cloud.get_object(self.cfg.bucket, "manifest.json")
        manifest = _manifest(raw, self.cfg.bucket)
        config_key, config_path, key = {
            "zookeeper": ("zookeeper.config", self.cfg.zookeeper_config, self.cfg.zookeeper.archive_key),
            "kafka": ("kafka.config", self.cfg.kafka_config, self.cfg.kafka.archive_key),
        }[name]
        if config_key in manifest:
            _verify(config_path, manifest[config_key], f"s3://{self.cfg.bucket}/{config_key}")
        entry = manifest.get(key)
        where = f"s3://{self.cfg.bucket}/{key}"
        if entry is None:
            raise CloudError(f"{where} is not in manifest.json: re-run `kafka-asg up` to upload it")
        dest = self.paths.downloads_dir / PurePosixPath(key).name
        self.prefetch.background(name)
        if not (dest.exists() and sha256_file(dest) == entry["sha256"]):
            tmp = dest.with_name(dest.name + ".part")
            try:
                _check_sha256(self.cloud.download(self.cfg.bucket, key, tmp), entry, where)
            except CloudError:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(dest)
        self.prefetch.hold(name)
        self.services.install(name, dest)

    def _render(self, slot_number: int, view: NodeView) -> None:
        slot = self.cfg.slot(slot_number)
        zoo = render.render_zoo_cfg(self.zk_base, self.cfg, slot)
        props = render.render_server_properties(self.kafka_base, self.cfg, slot, view.identity.az_id)
        # No fsync (three were 10-30 ms of a busy boot): every agent start renders them again before it starts a
        # server, so nothing ever reads what a power loss left of them. The rename still keeps them whole.
        atomic_write(self.zoo_cfg_path, zoo, durable=False)
        atomic_write(self.server_properties_path, props, durable=False)
        # myid lives in dataDir, i.e. on the zk-data volume: written after the identity check passed.
        self.host.write_file(Path(self.mountpoints["zk-data"]) / "myid", render.myid_text(slot), durable=False)
        self.memory = replace(self.memory, rendered=True)

    @property
    def zoo_cfg_path(self) -> Path:
        return self.paths.config_dir / "zoo.cfg"

    @property
    def server_properties_path(self) -> Path:
        return self.paths.config_dir / "server.properties"

    def _start(self, name: ServerName) -> None:
        config = self.zoo_cfg_path if name == "zookeeper" else self.server_properties_path
        self.services.start(name, config, {})

    def _stop_servers(self) -> None:
        # Kafka first: its controlled shutdown (on SIGTERM) needs ZooKeeper to move leadership away.
        if self.services.state("kafka").running:
            self.services.stop("kafka", self.settings.kafka_stop_timeout)
        if self.services.state("zookeeper").running:
            self.services.stop("zookeeper", self.settings.zookeeper_stop_timeout)

    # --------------------------------------------------------------------------------- publish
    def _publish(self, sentence: str, view: NodeView | None, *, report: bool = True) -> None:
        """The status file, every cycle; the instance tags too when ``report`` (else :meth:`report_tags` or a
        later cycle publishes them)."""
        # After a claim this cycle the view (taken before it) shows no ENI yet; memory knows the slot.
        slot = view.my_eni.slot if view is not None and view.my_eni is not None else self.memory.claimed_slot
        zk_mode = view.zk_mode if view is not None else "down"
        registered = bool(view and view.broker_registered)
        instance_id = self.identity.instance_id if self.identity else "unknown"
        try:
            write_status(
                self.paths.status_file,
                Status(
                    state=self.state,
                    reason=sentence,
                    instance_id=instance_id,
                    slot=slot,
                    zk_mode=zk_mode,
                    broker_registered=registered,
                    started_at=self._started_at,
                    state_since=self._state_since,
                    updated_at=self.clock.time(),
                    cycle=self.cycle,
                ),
            )
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.paths.status_file, exc)
        self._tag_values = {
            "state": self.state,
            "slot": "" if slot is None else str(slot),
            "zk-mode": zk_mode,
            "broker": "registered" if registered else "not registered",
            "decision": sentence,
        }
        if report:
            self.report_tags()

    def report_tags(self) -> None:
        """Publish the last cycle's state as instance tags (when due: see :meth:`_report`)."""
        if self.identity is not None and self._tag_values:
            self._report(self._tag_values)

    def _report(self, values: Mapping[str, str]) -> None:
        """Instance tags for ``kafka-asg status``: only when a value changed, plus a heartbeat per minute."""
        assert self.identity is not None
        now = self.clock.monotonic()
        tags = {TAG_PREFIX + k: v[:MAX_TAG_VALUE] for k, v in values.items()}
        since = None if self._reported_at is None else now - self._reported_at
        key_changed = any(tags[k] != self._reported.get(k) for k in tags if k != TAG_PREFIX + "decision")
        decision_changed = tags[TAG_PREFIX + "decision"] != self._reported.get(TAG_PREFIX + "decision")
        due = (
            since is None
            or key_changed
            or (decision_changed and since >= self.settings.report_min_interval)
            or since >= self.settings.heartbeat_seconds
        )
        if not due:
            return
        tags[TAG_PREFIX + "heartbeat"] = datetime.fromtimestamp(self.clock.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.cloud.report(self.identity.instance_id, tags)
        except KafkaAsgError as exc:
            logger.warning("could not report state as instance tags: %s", exc)
            return
        except Exception:
            # Reporting must never stop the loop that keeps the servers supervised.
            logger.exception("unexpected error reporting state as instance tags; please report it as a BUG")
            return
        self._reported, self._reported_at = tags, now

    # ---------------------------------------------------------------------------------- daemon
    def run_forever(self) -> int:
        """Cycle until SIGTERM/SIGINT (then stop Kafka with a controlled shutdown, then ZooKeeper) or until
        a warm-pool halt. Returns the process exit code."""
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        chained = 0
        self._prefetching = True  # run_cycle starts the prefetch (unit tests drive run_cycle without one)
        while not self._stop.is_set():
            self.run_cycle()
            if self.halted:
                return 0
            # Boot steps follow each other without a pause (the loop must not slow a boot down: target
            # <= 1 s of agent work per node); waits are paced. The cap keeps a bug from spinning.
            if self.progressed and chained < MAX_CHAINED_CYCLES:
                chained += 1
                continue
            chained = 0
            if not self._fast_device_wait:  # a device shows up within ~0.1 s: the boot steps go on right after it
                self.prefetch.release()
            self.pause()
        self.shutdown()
        return 0

    def pause(self, seconds: float | None = None) -> bool:
        """Wait ``seconds`` (default: :attr:`interval`) unless woken (a stop request, a watched change; one that
        came during the cycle ends the pause at once), or, in the first second of a wait for volumes it attached,
        until they all show up (a look at their device links every few ms: a whole cycle every 50 ms cost a boot
        25 ms on average). True when woken."""
        length = self.interval if seconds is None else seconds
        awaited = self._awaited_volumes() if seconds is None and self._fast_device_wait else []
        if not awaited:
            woken = self._wake.wait(length)
        else:
            deadline = time.monotonic() + length  # the wait itself is in real time, whatever the loop's clock
            woken = False
            while not woken and not all(self.host.shows(v) for v in awaited):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                woken = self._wake.wait(min(left, self.settings.device_look_interval))
        self._wake.clear()
        return woken

    def _awaited_volumes(self) -> list[str]:
        """Volumes attached to this instance that the last cycle did not see as devices."""
        view = self.last_view
        if view is None:
            return []
        mine = [v.volume_id for v in view.volumes if v.attached_to == view.instance_id]
        return [volume_id for volume_id in mine if view.disks.get(volume_id) is None]

    @property
    def interval(self) -> float:
        """Seconds until the next cycle after a wait, by the pace of the last decision."""
        if self.pace == "device":
            return self.settings.device_interval if self._fast_device_wait else self.settings.soon_interval
        return {
            "soon": self.settings.soon_interval,
            "watched": self.settings.watched_interval,
            "boot": self.settings.booting_interval,
            "idle": self.settings.serving_interval,
        }[self.pace]

    @property
    def _fast_device_wait(self) -> bool:
        """Waiting for a device it attached, for less than ``device_fast_seconds`` so far."""
        since = self._device_wait_since
        return (
            self.pace == "device"
            and since is not None
            and self.clock.monotonic() - since < self.settings.device_fast_seconds
        )

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: stopping after this cycle", signal.Signals(signum).name)
        self.request_stop()

    def shutdown(self) -> str:
        """Kafka controlled shutdown (SIGTERM + wait), then ZooKeeper; report ``stopping``."""
        self._set_state("stopping")
        sentence = "stopping: kafka controlled shutdown, then zookeeper"
        logger.info("%s", sentence)
        try:
            self._stop_servers()
        except KafkaAsgError as exc:
            sentence = f"stopping: {exc}"
            logger.error("while stopping the servers: %s", exc)
        self._publish(sentence, self.last_view)
        return sentence


def _manifest(raw: bytes, bucket: str) -> dict[str, dict[str, object]]:
    try:
        files = json.loads(raw)["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
        return files
    except (ValueError, KeyError, TypeError) as exc:
        raise CloudError(
            f"s3://{bucket}/manifest.json is not a kafka-asg manifest ({exc}); re-run `kafka-asg up`"
        ) from exc


def _verify(path: Path, entry: Mapping[str, object], where: str) -> None:
    _check_sha256(sha256_file(path), entry, where)


def _check_sha256(actual: str, entry: Mapping[str, object], where: str) -> None:
    if actual != entry.get("sha256"):
        raise CloudError(
            f"{where}: sha256 {actual} does not match manifest.json ({entry.get('sha256')}); "
            "the object changed after `kafka-asg up` or the download is corrupt: re-run `kafka-asg up`"
        )
