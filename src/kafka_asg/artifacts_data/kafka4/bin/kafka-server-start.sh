#!/bin/sh
# Run a KRaft node (broker, controller or both) in the foreground: kafka-server-start.sh server.properties
# [--override k=v ...]. The log directories must be formatted first (kafka-storage.sh format).
base_dir=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 server.properties [--override property=value]*" >&2; exit 2; }
# Server logging goes to files under LOG_DIR (config/log4j2.properties), as upstream.
export KAFKA_LOG4J_OPTS=${KAFKA_LOG4J_OPTS:-"-Dlog4j2.configurationFile=$base_dir/config/log4j2.properties"}
# A modest default heap (upstream: 1G); the agent sets KAFKA_HEAP_OPTS from the instance size.
export KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:-"-Xmx512m -Xms512m"}
exec "$base_dir/bin/kafka-run-class.sh" kafka.Kafka "$@"
