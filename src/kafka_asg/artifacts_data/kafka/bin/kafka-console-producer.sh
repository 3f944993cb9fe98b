#!/bin/sh
# Produce lines of stdin as messages (the class lives in kafka_2.13 in 3.9).
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.ConsoleProducer "$@"
