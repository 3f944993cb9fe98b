#!/bin/sh
# Produce lines of stdin as messages (the class moved to kafka-tools in 4.0).
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.ConsoleProducer "$@"
