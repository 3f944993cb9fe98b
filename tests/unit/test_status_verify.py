"""Pure parts of `status` and `verify`: rows from EC2 facts, srvr answers, quorum and broker checks."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from kafka_asg.config import seed_config
from kafka_asg.status import EniFacts, InstanceFacts, build_rows, render_table
from kafka_asg.verify import (
    Probe,
    ProbeRunner,
    VerifyFailed,
    broker_view,
    check_brokers,
    check_quorum,
    quorum_problems,
    settled,
    zk_mode_from_srvr,
)

SERVING = {
    "kafka-asg:state": "serving",
    "kafka-asg:zk-mode": "follower",
    "kafka-asg:broker": "registered",
    "kafka-asg:decision": "no action: zookeeper follower, broker 1 registered",
}


def test_rows_per_slot_then_surplus() -> None:
    enis = [
        EniFacts("eni-2", 2, "10.0.0.21", "eu-west-1b", "i-b"),
        EniFacts("eni-1", 1, "10.0.0.53", "eu-west-1a", "i-a"),
        EniFacts("eni-3", 3, "10.0.0.37", "eu-west-1c", None),
    ]
    instances = [
        InstanceFacts("i-a", "eu-west-1a", "running", SERVING),
        InstanceFacts("i-b", "eu-west-1b", "running", {"kafka-asg:state": "booting"}),
        InstanceFacts("i-s", "eu-west-1a", "running", {"kafka-asg:state": "standby"}),
        InstanceFacts("i-dead", "eu-west-1c", "terminated", {}),
    ]
    rows = build_rows(enis, instances)
    assert [r.slot for r in rows] == [1, 2, 3, None]
    assert rows[0].is_serving
    assert not rows[1].is_serving and rows[1].agent == "booting"
    assert rows[2].instance == "-" and rows[2].decision == "free slot"
    assert rows[3].instance == "i-s" and rows[3].agent == "standby"
    table = render_table(rows)
    assert table.splitlines()[0].startswith("SLOT")
    assert "surplus" in table.splitlines()[-1]


@pytest.mark.parametrize(
    ("answer", "mode"),
    [
        ("Zookeeper version: 3.8.7\nLatency min/avg/max: 0/0.0/0\nMode: leader\nNode count: 5\n", "leader"),
        ("Zookeeper version: 3.8.7\nMode: follower\n", "follower"),
        ("Mode: standalone\n", "standalone"),
        # What a lone server says; `nc` still exits 0, which is why the answer must be read.
        ("This ZooKeeper instance is not currently serving requests\n", "not serving"),
        ("", "no answer"),
    ],
)
def test_srvr_answers(answer: str, mode: str) -> None:
    assert zk_mode_from_srvr(answer) == mode


def test_quorum_needs_exactly_one_leader() -> None:
    assert quorum_problems({1: "leader", 2: "follower", 3: "follower"}) == []
    assert quorum_problems({1: "follower", 2: "follower", 3: "follower"}) == [
        "expected exactly one ZooKeeper leader, found 0 (slots [])"
    ]
    assert quorum_problems({1: "leader", 2: "not serving", 3: "follower"}) == ["slot 2: ZooKeeper not serving"]


def test_brokers_from_kcat_metadata() -> None:
    doc = '{"brokers": [{"id": 2, "name": "10.0.0.21:9095"}, {"id": 1, "name": "10.0.0.53:9095"}], "topics": []}'
    assert broker_view(doc) == (None, {1: "10.0.0.53:9095", 2: "10.0.0.21:9095"})


def _runner(answers: list[str]) -> tuple[ProbeRunner, list[str]]:
    """A probe runner that answers srvr from a script of answers, one per call, and records the commands."""
    calls: list[str] = []

    def run(argv: Sequence[str], timeout: float) -> Probe:
        calls.append(" ".join(argv))
        return Probe(0, answers[min(len(calls), len(answers)) - 1], "")

    return run, calls


def test_the_quorum_check_lets_a_busy_ensemble_settle() -> None:
    cfg = seed_config()
    # First round: slot 1 does not answer in time (a loaded host, an election); second round: all in quorum.
    run, calls = _runner(
        ["", "Mode: leader\n", "Mode: follower\n", "Mode: follower\n", "Mode: leader\n", "Mode: follower\n"]
    )
    modes = settled("zookeeper quorum", lambda: check_quorum(cfg, run), deadline=10)
    assert sorted(modes.values()) == ["follower", "follower", "leader"]
    assert len(calls) == 6 and "nc -w 5 10.0.0.53 2181" in calls[0]


def test_the_quorum_check_fails_with_the_last_problem_after_the_deadline() -> None:
    run, _ = _runner(["This ZooKeeper instance is not currently serving requests\n"])
    with pytest.raises(VerifyFailed, match=r"^ZooKeeper quorum: slot 1: ZooKeeper not serving; slot 2"):
        settled("zookeeper quorum", lambda: check_quorum(seed_config(), run), deadline=1.5)


def _metadata(answered_by: int, brokers: dict[int, str]) -> str:
    return json.dumps(
        {
            "originating_broker": {"id": answered_by, "name": f"{brokers.get(answered_by, '?')}/{answered_by}"},
            "brokers": [{"id": i, "name": name} for i, name in brokers.items()],
        }
    )


WHOLE = {1: "10.0.0.53:9095", 2: "10.0.0.21:9095", 3: "10.0.0.37:9095"}


def test_every_broker_must_know_every_broker() -> None:
    # Broker 3's cache still lacks the rejoined broker 1: it would refuse to auto-create an RF 3 topic.
    stale = {2: WHOLE[2], 3: WHOLE[3]}
    run, calls = _runner([_metadata(1, WHOLE), _metadata(2, WHOLE), _metadata(3, stale)])
    with pytest.raises(
        VerifyFailed,
        match=r"^kafka brokers, as broker 3 sees them: broker 1: expected at "
        r"10\.0\.0\.53:9095, metadata says not registered$",
    ):
        check_brokers(seed_config(), run)
    assert calls == [f"kcat -b {WHOLE[n]} -L -J -m 10" for n in (1, 2, 3)]


def test_a_broker_view_must_come_from_that_broker() -> None:
    run, _ = _runner([_metadata(2, WHOLE)])
    with pytest.raises(VerifyFailed, match=r"^kafka metadata from 10\.0\.0\.53:9095: answered by broker 2, not 1$"):
        check_brokers(seed_config(), run)


def test_the_broker_check_lets_a_lagging_cache_catch_up() -> None:
    stale = {2: WHOLE[2], 3: WHOLE[3]}
    answers = [_metadata(1, WHOLE), _metadata(2, stale), _metadata(1, WHOLE), _metadata(2, WHOLE), _metadata(3, WHOLE)]
    run, calls = _runner(answers)
    assert settled("kafka brokers", lambda: check_brokers(seed_config(), run), deadline=10) == WHOLE
    assert len(calls) == 5
