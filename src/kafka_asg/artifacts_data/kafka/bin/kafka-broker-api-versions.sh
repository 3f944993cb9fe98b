#!/bin/sh
# List the API versions every broker supports (a liveness probe).
exec "$(dirname "$0")/kafka-run-class.sh" kafka.admin.BrokerApiVersionsCommand "$@"
