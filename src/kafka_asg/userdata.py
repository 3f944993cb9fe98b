"""The launch template's user data: a short shell script that fetches the node agent and runs it.

AMI assumptions (documented in the README): a Linux with ``/bin/sh``, ``ip`` (iproute2), ``mkfs.ext4``, ``blkid``,
``mount``, ``tar``; python3 >= 3.11 and Java 17 are installed here when missing (``dnf`` on Amazon Linux 2023,
``apt-get`` on Debian/Ubuntu). A versioned name (python3.13, 3.12, 3.11) is taken at its word; a plain python3 is
asked its version (an interpreter start, 15 ms of every boot, spared where the name says it). Everything else
(kazoo) travels inside the agent zipapp. The same script runs on AWS and in the rehearsal, where only
``AWS_ENDPOINT_URL`` differs.
"""

from __future__ import annotations

import shlex
from importlib import resources

from kafka_asg.config import ClusterConfig

AGENT_KEY = "agent/kafka-asg-agent.pyz"
AGENT_PATH = "/opt/kafka-asg/kafka-asg-agent.pyz"
# EC2 rejects user data over 16 KB (before base64): https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/user-data.html
USER_DATA_LIMIT = 16 * 1024
# How the user data runs Python (the fetcher and the agent): isolated (-I: no PYTHON* variables, no user site) and
# without site-packages (-S), so only the standard library and what the zipapp carries can be imported.
AGENT_PYTHON_FLAGS = ("-I", "-S")

_TEMPLATE = """\
#!/bin/sh
# kafka-asg user data: fetch the node agent from S3 with the instance role and run it.
# Rendered by `kafka-asg up` for cluster {cluster}; cloud-init logs this to /var/log/cloud-init-output.log.
set -eu
CLUSTER={cluster}
BUCKET={bucket}
REGION={region}
AGENT={agent_path}
echo "kafka-asg: user data starting at $(date -u +%Y-%m-%dT%H:%M:%SZ)"

find_python() {{
  for p in python3.13 python3.12 python3.11 python3; do
    command -v "$p" >/dev/null 2>&1 || continue
    [ "$p" != python3 ] || "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || continue
    command -v "$p"; return 0
  done
  return 1
}}
if ! PY=$(find_python); then
  if command -v dnf >/dev/null 2>&1; then dnf install -y python3.11
  elif command -v apt-get >/dev/null 2>&1; then apt-get update -q && apt-get install -y -q python3
  fi
  PY=$(find_python) || {{ echo "kafka-asg: no python >= 3.11 on this AMI" >&2; exit 1; }}
fi
if ! command -v java >/dev/null 2>&1; then
  if command -v dnf >/dev/null 2>&1; then dnf install -y java-17-amazon-corretto-headless
  elif command -v apt-get >/dev/null 2>&1; then apt-get install -y -q openjdk-17-jre-headless
  fi
fi

mkdir -p "$(dirname "$AGENT")" /var/log/kafka-asg
# -I -S: isolated, no site-packages: the fetcher needs only the standard library, the agent only what its zipapp
# carries (pinned); nothing the AMI's Python has installed is imported, nor read at every start.
PY_FLAGS={py_flags}
"$PY" $PY_FLAGS - "$BUCKET" {agent_key} "$AGENT" "$REGION" <<'S3GET'
{s3get}
S3GET

ARGS="run --bucket $BUCKET --region $REGION --cluster $CLUSTER"
if [ -d /run/systemd/system ]; then
  # Under systemd: restart on failure; give Kafka's controlled shutdown time on stop.
  cat > /etc/systemd/system/kafka-asg-agent.service <<UNIT
[Unit]
Description=kafka-asg node agent ($CLUSTER)
After=network-online.target
Wants=network-online.target

[Service]
${{AWS_ENDPOINT_URL:+Environment=AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL}}
ExecStart=$PY $PY_FLAGS $AGENT $ARGS
Restart=always
RestartSec=5
KillMode=mixed
TimeoutStopSec=180

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now kafka-asg-agent.service
else
  # No service manager (e.g. the rehearsal's instances): a detached restart loop does its job.
  AGENT_CMD="\\"$PY\\" $PY_FLAGS \\"$AGENT\\" $ARGS"
  setsid sh -c "while :; do $AGENT_CMD; echo \\"kafka-asg: agent exited (\\$?)\\"; sleep 5; done" \\
    >>/var/log/kafka-asg/agent.log 2>&1 </dev/null &
fi
echo "kafka-asg: agent started"
"""


def render_user_data(cfg: ClusterConfig) -> str:
    """The user data script for ``cfg``; raises ValueError if it would exceed EC2's 16 KB limit."""
    s3get = resources.files("kafka_asg").joinpath("s3get.py").read_text()
    script = _TEMPLATE.format(
        cluster=shlex.quote(cfg.name),
        bucket=shlex.quote(cfg.bucket),
        region=shlex.quote(cfg.region),
        agent_path=shlex.quote(AGENT_PATH),
        agent_key=shlex.quote(AGENT_KEY),
        py_flags=shlex.quote(" ".join(AGENT_PYTHON_FLAGS)),
        s3get=s3get.rstrip("\n"),
    )
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ValueError(f"user data is {len(script.encode())} bytes; EC2 allows {USER_DATA_LIMIT}")
    return script
