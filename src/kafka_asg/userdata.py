"""The launch template's user data: a short shell script that installs the node agent's service.

AMI assumptions (documented in the README): a Linux with ``/bin/sh``, ``base64``, ``gzip``, ``ip`` (iproute2),
``mkfs.ext4`` and ``blkid``; python3 >= 3.11 and Java 17 are installed here when missing (``dnf`` on Amazon Linux
2023, ``apt-get`` on Debian/Ubuntu). A versioned name (python3.13, 3.12, 3.11) is taken at its word; a plain python3
is asked its version (an interpreter start, 15 ms of every boot, spared where the name says it). Everything else
(kazoo) travels inside the agent zipapp. The same script runs on AWS and in the rehearsal, where only
``AWS_ENDPOINT_URL`` differs.

The service runs the fetcher (``kafka_asg/s3get.py``) at every start: it downloads the agent zipapp from S3 with
the instance role and runs it in the same Python process (one interpreter start per agent start, not two), or
runs the one fetched before when S3 is out of reach. A restarted agent is thus the bucket's current one.
"""

from __future__ import annotations

import ast
import base64
import gzip
import io
import shlex
import tokenize
from importlib import resources

from kafka_asg.config import ClusterConfig

AGENT_KEY = "agent/kafka-asg-agent.pyz"
AGENT_PATH = "/opt/kafka-asg/kafka-asg-agent.pyz"
FETCHER_PATH = "/opt/kafka-asg/s3get.py"
# EC2 rejects user data over 16 KB (before base64): https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/user-data.html
USER_DATA_LIMIT = 16 * 1024
# How the service runs Python (the fetcher, and the agent in it): isolated (-I: no PYTHON* variables, no user site)
# and without site-packages (-S), so only the standard library and what the zipapp carries can be imported.
AGENT_PYTHON_FLAGS = ("-I", "-S")

_TEMPLATE = """\
#!/bin/sh
# kafka-asg user data: install the service that fetches the node agent from S3 and runs it.
# Rendered by `kafka-asg up` for cluster {cluster}; cloud-init logs this to /var/log/cloud-init-output.log.
set -eu
CLUSTER={cluster}
BUCKET={bucket}
REGION={region}
AGENT={agent_path}
FETCHER={fetcher_path}
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
# The fetcher: kafka_asg/s3get.py (stdlib only) without docstrings and comments, gzip'd and base64'd to fit here.
base64 -d <<'S3GET' | gzip -dc > "$FETCHER.part"
{fetcher}
S3GET
mv "$FETCHER.part" "$FETCHER"

# -I -S: isolated, no site-packages: only the standard library and what the agent zipapp carries (pinned) are
# imported, nothing the AMI's Python has installed. At every start: fetch the agent, run it in the same Python.
ARGS="run --bucket $BUCKET --region $REGION --cluster $CLUSTER"
RUN="$PY {py_flags} $FETCHER $BUCKET {agent_key} $AGENT $REGION $ARGS"
if [ -d /run/systemd/system ]; then
  # Under systemd: restart on failure; give Kafka's controlled shutdown time on stop.
  cat > /etc/systemd/system/kafka-asg-agent.service <<UNIT
[Unit]
Description=kafka-asg node agent ($CLUSTER)
After=network-online.target
Wants=network-online.target

[Service]
${{AWS_ENDPOINT_URL:+Environment=AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL}}
ExecStart=$RUN
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
  setsid sh -c "while :; do $RUN; echo \\"kafka-asg: agent exited (\\$?)\\"; sleep 5; done" \\
    >>/var/log/kafka-asg/agent.log 2>&1 </dev/null &
fi
echo "kafka-asg: agent service started"
"""


def fetcher_source() -> str:
    """``kafka_asg/s3get.py`` without its docstrings, comments and blank lines, otherwise as written: what instances
    run. Cut by line, never parsed and unparsed: ``ast.unparse`` of Python 3.12 writes f-strings that 3.11, which an
    instance may run, cannot read."""
    source = resources.files("kafka_asg").joinpath("s3get.py").read_text()
    lines = dict(enumerate(source.splitlines(keepends=True), 1))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            doc = node.body[0]
            for n in range(doc.lineno, (doc.end_lineno or doc.lineno) + 1):
                lines[n] = ""
            if len(node.body) == 1:  # a body of nothing but its docstring
                lines[doc.lineno] = " " * doc.col_offset + "pass\n"
    in_strings: set[int] = set()  # lines inside a multi-line string: kept as they are
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING and token.end[0] > token.start[0]:
            in_strings.update(range(token.start[0] + 1, token.end[0] + 1))
        elif token.type == tokenize.COMMENT and lines[token.start[0]]:
            kept = lines[token.start[0]][: token.start[1]].rstrip()
            lines[token.start[0]] = kept + "\n" if kept else ""
    return "".join(line for n, line in lines.items() if line.strip() or n in in_strings)


def embedded(source: str) -> str:
    """gzip (no timestamp: the same user data for the same source, so `up` changes no launch template) and base64,
    in 76-character lines."""
    return base64.encodebytes(gzip.compress(source.encode(), 9, mtime=0)).decode().rstrip("\n")


def render_user_data(cfg: ClusterConfig) -> str:
    """The user data script for ``cfg``; raises ValueError if it would exceed EC2's 16 KB limit."""
    script = _TEMPLATE.format(
        cluster=shlex.quote(cfg.name),
        bucket=shlex.quote(cfg.bucket),
        region=shlex.quote(cfg.region),
        agent_path=shlex.quote(AGENT_PATH),
        fetcher_path=shlex.quote(FETCHER_PATH),
        agent_key=shlex.quote(AGENT_KEY),
        py_flags=" ".join(AGENT_PYTHON_FLAGS),
        fetcher=embedded(fetcher_source()),
    )
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ValueError(f"user data is {len(script.encode())} bytes; EC2 allows {USER_DATA_LIMIT}")
    return script
