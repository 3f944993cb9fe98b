#!/bin/sh
# Run a Kafka 4.x main class: kafka-run-class.sh [-name NAME] [-daemon] CLASS [args...]
# Written for kafka-asg (foreground only). Honours JAVA_HOME, KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS,
# KAFKA_OPTS, KAFKA_LOG4J_OPTS, LOG_DIR and CLASSPATH like upstream's script. Kafka 4.x logs through Log4j2,
# so the config is passed as -Dlog4j2.configurationFile (Log4j 1's -Dlog4j.configuration is ignored).
base_dir=$(cd "$(dirname "$0")/.." && pwd)
[ "$1" = "-name" ] && shift 2   # accepted for compatibility; foreground processes need no name
[ "$1" = "-daemon" ] && { echo "kafka-run-class.sh: -daemon is not supported; run under a supervisor" >&2; exit 2; }
[ $# -ge 1 ] || { echo "usage: $0 CLASS [args...]" >&2; exit 2; }
for jar in "$base_dir"/libs/*.jar; do CLASSPATH="${CLASSPATH:+$CLASSPATH:}$jar"; done
export CLASSPATH
LOG_DIR=${LOG_DIR:-$base_dir/logs}
mkdir -p "$LOG_DIR"
KAFKA_LOG4J_OPTS=${KAFKA_LOG4J_OPTS:-"-Dlog4j2.configurationFile=$base_dir/config/tools-log4j2.properties"}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:-"-Xmx256m"}
KAFKA_JVM_PERFORMANCE_OPTS=${KAFKA_JVM_PERFORMANCE_OPTS:-"-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true"}
if [ -n "$JAVA_HOME" ]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi
exec "$JAVA" $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS "-Dkafka.logs.dir=$LOG_DIR" $KAFKA_LOG4J_OPTS \
  -cp "$CLASSPATH" $KAFKA_OPTS "$@"
