# Shared by zkServer.sh and zkCli.sh (sourced): locate the install, Java and the classpath.
# Written for kafka-asg; honours the variables upstream's zkEnv.sh documents.
ZOOBINDIR=$(cd "$(dirname "$0")" && pwd)
ZOOKEEPER_PREFIX=$(dirname "$ZOOBINDIR")
ZOOCFGDIR=${ZOOCFGDIR:-$ZOOKEEPER_PREFIX/conf}
ZOO_LOG_DIR=${ZOO_LOG_DIR:-$ZOOKEEPER_PREFIX/logs}
if [ -n "$JAVA_HOME" ]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi
CLASSPATH="$ZOOCFGDIR"
for jar in "$ZOOKEEPER_PREFIX"/lib/*.jar; do CLASSPATH="$CLASSPATH:$jar"; done
export CLASSPATH
