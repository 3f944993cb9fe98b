#!/bin/sh
# Run a Kafka broker in the foreground: kafka-server-start.sh server.properties [--override k=v ...]
base_dir=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 server.properties [--override property=value]*" >&2; exit 2; }
# Broker logging goes to files under LOG_DIR (config/log4j.properties), as upstream.
export KAFKA_LOG4J_OPTS=${KAFKA_LOG4J_OPTS:-"-Dlog4j.configuration=file:$base_dir/config/log4j.properties"}
# A modest default heap (upstream: 1G); the agent sets KAFKA_HEAP_OPTS from the instance size.
export KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:-"-Xmx512m -Xms512m"}
exec "$base_dir/bin/kafka-run-class.sh" kafka.Kafka "$@"
