"""RecentReads: EC2 reads reused for a moment during "soon" waits, forgotten on every write."""

from __future__ import annotations

from pathlib import Path

from kafka_asg.agent.fakes import FakeClock, FakeCloud, FakeWorld
from kafka_asg.agent.reads import Recent, RecentReads


def make() -> tuple[FakeWorld, FakeClock, RecentReads]:
    world = FakeWorld()
    world.add_eni("c", 2, "10.0.0.21", "subnet-1b")
    world.add_volume("c", 2, "zk-data", "eu-west-1b")
    world.instances["i-self"] = "running"
    clock = FakeClock()
    return world, clock, RecentReads(FakeCloud(world), clock.monotonic, max_age=0.9)


def test_reads_are_reused_within_max_age_then_read_again() -> None:
    world, clock, reads = make()
    first = reads.slot_enis("c", "subnet-1b")
    clock.advance(0.5)
    assert reads.slot_enis("c", "subnet-1b") == first
    assert world.calls.count("slot_enis") == 1
    clock.advance(0.5)
    reads.slot_enis("c", "subnet-1b")
    assert world.calls.count("slot_enis") == 2


def test_different_arguments_are_different_reads() -> None:
    world, _, reads = make()
    reads.slot_enis("c", "subnet-1b")
    reads.slot_enis("c", "subnet-1c")
    assert world.calls.count("slot_enis") == 2


def test_a_claim_forgets_everything_read() -> None:
    world, _, reads = make()
    assert reads.slot_enis("c", "subnet-1b")[0].attached_to is None
    reads.slot_volumes("c", 2)
    reads.attach_eni("eni-0002", "i-self", 1)
    # Read back at once: the claim is checked against what EC2 says now, never against a cached read.
    assert reads.slot_enis("c", "subnet-1b")[0].attached_to == "i-self"
    reads.slot_volumes("c", 2)
    assert (world.calls.count("slot_enis"), world.calls.count("slot_volumes")) == (2, 2)


def test_an_attached_volume_forgets_the_volume_reads_only() -> None:
    world, _, reads = make()
    reads.slot_enis("c", "subnet-1b")
    assert reads.slot_volumes("c", 2)[0].attached_to is None
    reads.attach_volume("vol-2zkdata", "i-self", "/dev/sdf")
    assert reads.slot_volumes("c", 2)[0].attached_to == "i-self"
    reads.slot_enis("c", "subnet-1b")
    assert (world.calls.count("slot_enis"), world.calls.count("slot_volumes")) == (1, 2)


def test_scale_in_protection_forgets_nothing() -> None:
    world, _, reads = make()
    reads.slot_enis("c", "subnet-1b")
    reads.set_scale_in_protection("asg", "i-self", True)
    reads.slot_enis("c", "subnet-1b")
    assert world.calls.count("slot_enis") == 1


def test_objects_and_reports_are_never_cached(tmp_path: Path) -> None:
    world, _, reads = make()
    world.put_object("b", "k", b"one")
    assert reads.get_object("b", "k") == b"one"
    world.put_object("b", "k", b"two")
    assert reads.get_object("b", "k") == b"two"
    reads.download("b", "k", tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == b"two"


def test_a_holder_seen_shutting_down_is_not_described_again() -> None:
    world, clock, reads = make()
    world.instances["i-dying"] = "shutting-down"
    world.instances["i-stopping"] = "stopping"
    for _ in range(3):
        assert reads.instance_state("i-dying") == "shutting-down"
        assert reads.instance_state("i-stopping") == "stopping"
        reads.forget()  # as after a step or a wait on EC2
        clock.advance(1.0)
    # shutting-down only ever becomes terminated; a stopping instance can be started again: described every time.
    assert world.calls.count("instance_state i-dying") == 1
    assert world.calls.count("instance_state i-stopping") == 3


def test_recent_keeps_what_keep_accepts_for_max_age_and_forgets_what_is_stale() -> None:
    clock = FakeClock()
    fetched: list[str] = []

    def fetch(value: str | None) -> str | None:
        fetched.append(str(value))
        return value

    recent = Recent(clock.monotonic, max_age=0.9)
    assert recent.get("nic", lambda: fetch(None), keep=lambda v: v is not None) is None
    assert recent.get("nic", lambda: fetch("ens6"), keep=lambda v: v is not None) == "ens6"  # None was not kept
    assert recent.get("nic", lambda: fetch("ens7")) == "ens6"
    assert recent.get(("probe", "a"), lambda: fetch("ext4")) == "ext4"
    recent.forget(lambda key: key == "nic")
    assert recent.get("nic", lambda: fetch("ens8")) == "ens8"
    assert recent.get(("probe", "a"), lambda: fetch("xfs")) == "ext4"
    clock.advance(1.0)
    assert recent.get(("probe", "a"), lambda: fetch("xfs")) == "xfs"
    assert fetched == ["None", "ens6", "ext4", "ens8", "xfs"]
    never = Recent(clock.monotonic, max_age=0.0)
    assert [never.get("k", lambda: fetch("x")) for _ in range(2)] == ["x", "x"]
    assert fetched[-2:] == ["x", "x"]
