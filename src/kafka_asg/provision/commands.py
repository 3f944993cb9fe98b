"""``kafka-asg plan``: what ``up`` would change, and why (terraform's ``-detailed-exitcode`` semantics)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kafka_asg.config import ClusterConfig, load_config
from kafka_asg.errors import KafkaAsgError, Unavailable
from kafka_asg.provision.apply import plan
from kafka_asg.provision.clients import aws_clients
from kafka_asg.provision.inputs import ProvisionInputs

logger = logging.getLogger(__name__)

EXIT_NO_CHANGES, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


def local_endpoint() -> str:
    """The running local region's operator endpoint (``kafka-asg local start`` / ``up --local`` start it)."""
    from kafka_asg.local.commands import region_info

    info = region_info()
    if info is None:
        raise Unavailable(
            "the local region is not running: `kafka-asg up --local` or `kafka-asg local start` starts it"
        )
    return info.endpoint_url


def _inputs(cfg: ClusterConfig) -> ProvisionInputs:
    from kafka_asg.operator import gather_inputs  # the lead's: user data + archives + agent zipapp

    return gather_inputs(cfg, build=False)  # type: ignore[no-any-return,unused-ignore]


def cmd_plan(args: argparse.Namespace) -> int:
    local = bool(getattr(args, "local", False))
    cfg = load_config(Path(args.config) if args.config else None, local=local)  # validates before any AWS call
    try:
        clients = aws_clients(cfg, endpoint_url=local_endpoint() if local else None)
        the_plan = plan(cfg, clients, _inputs(cfg))
    except KafkaAsgError:
        if args.detailed_exitcode:
            logger.exception("plan failed")
            return EXIT_ERROR
        raise
    if args.json:
        print(json.dumps(the_plan.to_json(), indent=2))
    else:
        print(the_plan.render_text())
    if args.detailed_exitcode:
        return EXIT_NO_CHANGES if the_plan.is_empty else EXIT_CHANGES
    return 0
