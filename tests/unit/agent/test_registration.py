"""Whether a /brokers/ids/<id> node is the running broker's registration, not a dead predecessor's."""

from __future__ import annotations

import json
import os
import time

from kafka_asg.agent.ports import ServerState
from kafka_asg.agent.servers import process_start_time, registration_time
from kafka_asg.agent.snapshot import classify_registration

STARTED = 1_790_000_100.0
KAFKA = ServerState("kafka", True, 4242, 0, None, STARTED)
STOPPED = ServerState("kafka", False, None, 0, None, None)


def broker_json(timestamp_ms: int) -> bytes:
    # What Kafka 3.9 writes (KafkaZkClient.registerBroker, BrokerInfo version 5).
    return json.dumps(
        {
            "listener_security_protocol_map": {"PLAINTEXT": "PLAINTEXT"},
            "endpoints": ["PLAINTEXT://10.0.0.21:9095"],
            "rack": "euw1-az2",
            "jmx_port": -1,
            "port": 9095,
            "host": "10.0.0.21",
            "version": 5,
            "timestamp": str(timestamp_ms),
        }
    ).encode()


def test_registration_time_is_kafkas_timestamp_else_the_nodes_ctime() -> None:
    assert registration_time(broker_json(1_790_000_102_500), 1_790_000_103_000) == 1_790_000_102.5
    assert registration_time(b"not json", 1_790_000_103_000) == 1_790_000_103.0
    assert registration_time(b'{"version": 5}', 1_790_000_104_000) == 1_790_000_104.0


def test_written_after_the_running_kafka_started_is_its_own() -> None:
    assert classify_registration(STARTED + 2.5, KAFKA) == (True, False)


def test_a_predecessors_node_is_a_leftover() -> None:
    # The old holder registered minutes ago; its session outlives it by the session timeout.
    assert classify_registration(STARTED - 300, KAFKA) == (False, True)
    assert classify_registration(STARTED - 300, STOPPED) == (False, True)


def test_no_node_is_neither() -> None:
    assert classify_registration(None, KAFKA) == (False, False)
    assert classify_registration(None, STOPPED) == (False, False)


def test_a_second_of_slack_for_a_start_time_read_from_proc() -> None:
    assert classify_registration(STARTED - 0.5, KAFKA) == (True, False)
    assert classify_registration(STARTED - 1.5, KAFKA) == (False, True)


def test_process_start_time_of_this_process() -> None:
    started = process_start_time(os.getpid())
    assert time.time() - 3600 * 24 < started <= time.time() + 1
    assert process_start_time(2**22 + 7) == 0.0  # no such process: unknown, so any registration counts
