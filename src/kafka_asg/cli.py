"""The operator CLI, ``kafka-asg``: argument parsing only.

Each command is a function ``(args) -> exit code`` in the module that owns the work; they are imported
lazily so ``kafka-asg validate`` never imports boto3 or moto.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import cast

from kafka_asg import __version__
from kafka_asg.errors import KafkaAsgError

Handler = Callable[[argparse.Namespace], int]


def _handler(dotted: str) -> Handler:
    module_name, _, func = dotted.rpartition(":")
    return cast(Handler, getattr(importlib.import_module(module_name), func))


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, target: str, help_text: str
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(target=target)
    return parser


def _config_options(parser: argparse.ArgumentParser, local: bool = True) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="cluster config file (default ./cluster.toml; with --local and no file, the seed example)",
    )
    if local:
        parser.add_argument("--local", action="store_true", help="use the local region (the rehearsal on this machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kafka-asg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kafka-asg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "init", "kafka_asg.commands:cmd_init", "write the seed's cluster as a commented example")
    p.add_argument("path", nargs="?", default="cluster.toml")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    p = _add(sub, "validate", "kafka_asg.commands:cmd_validate", "check the config offline; list all problems")
    _config_options(p, local=False)

    p = _add(sub, "plan", "kafka_asg.provision.commands:cmd_plan", "show what up would change, and why")
    _config_options(p)
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0 no changes, 2 changes, 1 error")
    p.add_argument("--json", action="store_true", help="machine-readable plan")

    p = _add(sub, "up", "kafka_asg.operator:cmd_up", "create or update every resource (idempotent)")
    _config_options(p)
    p.add_argument("--no-wait", action="store_true", help="with --local: do not wait for the cluster to serve")

    p = _add(sub, "down", "kafka_asg.operator:cmd_down", "remove every resource, in reverse order")
    _config_options(p)
    p.add_argument("--delete-data", action="store_true", help="also delete the per-slot data volumes")

    p = _add(sub, "status", "kafka_asg.operator:cmd_status", "one row per slot, plus surplus instances")
    _config_options(p)
    p.add_argument("--json", action="store_true")

    p = _add(sub, "verify", "kafka_asg.operator:cmd_verify", "check quorum, brokers, and a produce/consume")
    _config_options(p)
    p.add_argument("--messages", type=int, default=100, help="messages to produce and consume back")

    p = _add(sub, "artifacts", "kafka_asg.artifacts:cmd_artifacts", "build server archives from Maven Central")
    p.add_argument("action", choices=["build", "list"])
    p.add_argument("--kraft", action="store_true", help="also build the Kafka 4.x archive (KRaft mode)")
    _config_options(p, local=False)

    p = _add(sub, "local", "kafka_asg.local.commands:cmd_local", "the local region (rehearsal of AWS)")
    p.add_argument(
        "action",
        choices=[
            "start",
            "stop",
            "status",
            "env",
            "exec",
            "kill",
            "pause",
            "resume",
            "partition",
            "heal",
            "az-down",
            "az-up",
            "serve",
        ],
    )
    # dest "rest": "target" already holds the handler (set_defaults), which a positional would overwrite.
    p.add_argument("rest", nargs="*", metavar="target", help="SLOT|INSTANCE|AZ, or the command for exec (after --)")
    _config_options(p, local=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "kazoo", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _handler(args.target)(args)
    except KafkaAsgError as exc:
        print(f"kafka-asg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kafka-asg: interrupted (safe to re-run)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
