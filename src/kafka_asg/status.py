"""``kafka-asg status``: one row per slot plus surplus instances, built from what EC2 says.

The agents publish their state as tags on their own instances (``kafka-asg:state``, ``:zk-mode``, ``:broker``,
``:decision``), so the table needs only Describe calls: it works the same on AWS and in the rehearsal, and
needs no route into the VPC. ``build_rows`` is pure; ``observe`` does the two Describe calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kafka_asg.config import CLUSTER_TAG, SLOT_TAG, ClusterConfig

STATE_TAG = "kafka-asg:state"
ZK_MODE_TAG = "kafka-asg:zk-mode"
BROKER_TAG = "kafka-asg:broker"
DECISION_TAG = "kafka-asg:decision"
ASG_TAG = "aws:autoscaling:groupName"


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: str
    az: str
    state: str  # EC2 state: pending, running, shutting-down, ...
    tags: Mapping[str, str]


@dataclass(frozen=True)
class EniFacts:
    eni_id: str
    slot: int
    ip: str
    az: str
    attached_to: str | None


@dataclass(frozen=True)
class Row:
    slot: int | None  # None: a surplus instance that holds no slot
    az: str
    ip: str
    eni: str
    instance: str
    agent: str
    zk_mode: str
    broker: str
    decision: str

    @property
    def is_serving(self) -> bool:
        return (
            self.slot is not None
            and self.agent == "serving"
            and self.zk_mode in ("leader", "follower")
            and self.broker == "registered"
        )


def build_rows(enis: Sequence[EniFacts], instances: Sequence[InstanceFacts]) -> list[Row]:
    """Rows sorted by slot, then one row per live ASG instance that holds no slot (standby/booting)."""
    by_id = {i.instance_id: i for i in instances}
    rows: list[Row] = []
    holders: set[str] = set()
    for eni in sorted(enis, key=lambda e: e.slot):
        inst = by_id.get(eni.attached_to or "")
        if eni.attached_to:
            holders.add(eni.attached_to)
        tags = inst.tags if inst else {}
        rows.append(
            Row(
                slot=eni.slot,
                az=eni.az,
                ip=eni.ip,
                eni=eni.eni_id,
                instance=eni.attached_to or "-",
                agent=tags.get(STATE_TAG, "no agent report" if inst else "-"),
                zk_mode=tags.get(ZK_MODE_TAG, "-"),
                broker=tags.get(BROKER_TAG, "-"),
                decision=tags.get(DECISION_TAG, "free slot" if not eni.attached_to else "-"),
            )
        )
    for inst in sorted(instances, key=lambda i: i.instance_id):
        if inst.instance_id in holders or inst.state in ("shutting-down", "terminated"):
            continue
        rows.append(
            Row(
                slot=None,
                az=inst.az,
                ip="-",
                eni="-",
                instance=inst.instance_id,
                agent=inst.tags.get(STATE_TAG, inst.state),
                zk_mode="-",
                broker="-",
                decision=inst.tags.get(DECISION_TAG, "-"),
            )
        )
    return rows


def render_table(rows: Sequence[Row]) -> str:
    headers = ("SLOT", "AZ", "FIXED IP", "ENI", "INSTANCE", "AGENT", "ZOOKEEPER", "BROKER", "LAST DECISION")
    cells = [
        (
            str(r.slot) if r.slot is not None else "surplus",
            r.az,
            r.ip,
            r.eni,
            r.instance,
            r.agent,
            r.zk_mode,
            r.broker,
            r.decision if len(r.decision) <= 70 else r.decision[:67] + "...",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return "\n".join(lines)


def rows_json(rows: Sequence[Row]) -> str:
    return json.dumps([asdict(r) | {"serving": r.is_serving} for r in rows], indent=2)


def _tags(raw: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in raw or ()}


def observe(cfg: ClusterConfig, ec2: Any) -> tuple[list[EniFacts], list[InstanceFacts]]:
    """Two paginated Describe calls: the cluster's slot ENIs and the ASG's instances."""
    enis: list[EniFacts] = []
    for page in ec2.get_paginator("describe_network_interfaces").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cfg.name]}]
    ):
        for ni in page["NetworkInterfaces"]:
            tags = _tags(ni.get("TagSet"))
            if SLOT_TAG not in tags:
                continue
            attachment = ni.get("Attachment") or {}
            attached = attachment.get("InstanceId") if attachment.get("Status") in ("attaching", "attached") else None
            enis.append(
                EniFacts(
                    eni_id=ni["NetworkInterfaceId"],
                    slot=int(tags[SLOT_TAG]),
                    ip=ni["PrivateIpAddress"],
                    az=ni["AvailabilityZone"],
                    attached_to=attached,
                )
            )
    instances: list[InstanceFacts] = []
    for page in ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{ASG_TAG}", "Values": [cfg.asg_name]}]
    ):
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                instances.append(
                    InstanceFacts(
                        instance_id=inst["InstanceId"],
                        az=inst["Placement"]["AvailabilityZone"],
                        state=inst["State"]["Name"],
                        tags=_tags(inst.get("Tags")),
                    )
                )
    return enis, instances
