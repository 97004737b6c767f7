#!/usr/bin/env bash
# Single-node KRaft Kafka broker for tests, CI and demos: plain `java` on jars
# that Maven fetched into lib/ (see pom.xml). Usage: see usage() or README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
LIB=$HERE/lib
MAX_BYTES=${KAFKA_MAX_MESSAGE_BYTES:-16777216}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-60}
# C1-only JIT: ready in ~3 s instead of ~4.5 s on 2 cores; fast enough for test traffic.
read -ra JVM_OPTS <<<"${KAFKA_JVM_OPTS:--Xmx512m -Xms128m -XX:TieredStopAtLevel=1}"

die() { echo "broker.sh: $*" >&2; exit 1; }

[[ $MAX_BYTES =~ ^[0-9]+$ ]] || die "KAFKA_MAX_MESSAGE_BYTES must be a number of bytes, not '$MAX_BYTES'"

usage() {
  cat >&2 <<'EOF'
usage: broker.sh fetch        fetch jars into lib/ (no-op when up to date)
       broker.sh start DIR    start a broker with its state in DIR; prints host:port
       broker.sh stop DIR     stop it (SIGTERM, SIGKILL after 20 s); idempotent
       broker.sh status DIR   "running pid=N bootstrap=host:port" or "not running" (exit 3)
env:   KAFKA_MAX_MESSAGE_BYTES (16777216)  KAFKA_START_TIMEOUT (60 s)  JAVA_HOME
       KAFKA_JVM_OPTS (-Xmx512m -Xms128m -XX:TieredStopAtLevel=1)
       KAFKA_VERSION (overrides the version in pom.xml; refetches lib/)
EOF
  exit 2
}

find_java() {
  if [[ -n ${JAVA_HOME:-} ]]; then
    JAVA=$JAVA_HOME/bin/java
    [[ -x $JAVA ]] || die "JAVA_HOME=$JAVA_HOME has no bin/java"
  else
    JAVA=$(command -v java) || die "java not found: install Java 17+ or set JAVA_HOME"
  fi
  local ver major
  ver=$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)
  major=${ver%%.*}
  [[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$ver")   # "1.8.0_x" style
  major=${major%%[!0-9]*}                               # "17-ea" style
  [[ -n $major ]] && (( major >= 17 )) ||
    die "Kafka 4 needs Java 17+, but $JAVA is version '${ver:-unknown}'; set JAVA_HOME to a JDK 17+"
}

# lib/ is rebuilt whenever pom.xml or KAFKA_VERSION changes.
lib_stamp() { echo "$(cksum <"$HERE/pom.xml") ${KAFKA_VERSION:-}"; }
lib_fresh() { [[ -f $LIB/.stamp && $(<"$LIB/.stamp") == "$1" ]]; }

cmd_fetch() {
  local want tmp
  want=$(lib_stamp)
  lib_fresh "$want" && return 0
  command -v mvn >/dev/null ||
    die "lib/ is missing or stale and mvn is not on PATH (fetching needs Maven and Maven Central)"
  # Parallel CI jobs may all call start on a fresh checkout; only one may build lib/.
  exec 9>"$HERE/lib.lock"
  command -v flock >/dev/null && flock 9
  if ! lib_fresh "$want"; then
    echo "broker.sh: fetching Kafka jars into $LIB ..." >&2
    tmp=$HERE/lib.tmp.$$
    rm -rf "$tmp"
    mvn -B -q -Dstyle.color=never -f "$HERE/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$tmp" ${KAFKA_VERSION:+"-Dkafka.version=$KAFKA_VERSION"} >"$tmp.log" 2>&1 ||
      { cat "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"; die "maven could not fetch the Kafka jars (see above)"; }
    rm -f "$tmp.log"
    echo "$want" >"$tmp/.stamp"
    rm -rf "$LIB"
    mv "$tmp" "$LIB"
  fi
  exec 9>&-
}

abs_dir() { [[ -d $1 ]] && (cd "$1" && pwd -P); }

# Prints the broker pid if DIR's broker is alive. Matching the command line guards
# against recycled pids and treats an unreaped (zombie) java as dead.
running_pid() {
  local dir=$1 pid
  [[ -f $dir/broker.pid ]] || return 1
  pid=$(<"$dir/broker.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $dir/server.properties" || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Below the kernel's ephemeral range (32768+), so outgoing connections never hold
# it. Another process can still grab it before Kafka binds: start retries on that.
pick_port() {
  local p _
  for _ in {1..100}; do
    p=$((20000 + RANDOM % 12000))
    [[ $p != "${1:-}" ]] && ! port_open "$p" && { echo "$p"; return 0; }
  done
  die "no free TCP port found on 127.0.0.1"
}

write_config() {
  local dir=$1 cport sock=104857600
  BPORT=$(pick_port)
  cport=$(pick_port "$BPORT")
  # Kafka's default request cap (100 MiB) already fits; only raise it, never lower it.
  (( MAX_BYTES + 1048576 > sock )) && sock=$((MAX_BYTES + 1048576))
  cat >"$dir/server.properties" <<EOF
# Written by broker.sh start, with fresh ports on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$BPORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$BPORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# One node: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# 1 partition instead of 50 makes the first consumer group / transaction ready sooner.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
# Image payloads (KAFKA_MAX_MESSAGE_BYTES).
message.max.bytes=$MAX_BYTES
replica.fetch.max.bytes=$MAX_BYTES
socket.request.max.bytes=$sock
EOF
}

# $2 names the log file: the storage tool and the broker each get their own.
java_props() {
  JPROPS=("-Dkafka.logs.dir=$1/logs" "-Dkafka.log.name=$2" "-Dlog4j2.configurationFile=$HERE/log4j2.properties")
}

format_storage() {
  local dir=$1 cid
  # Restarting in the same DIR keeps its topics; static voters make new ports fine.
  [[ -f $dir/data/meta.properties ]] && return 0
  # A cluster id is 16 random bytes in URL-safe base64; Kafka refuses ones starting with '-'.
  cid=-
  while [[ $cid == -* ]]; do cid=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='); done
  java_props "$dir" format
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 "${JPROPS[@]}" -cp "$LIB/*" kafka.tools.StorageTool \
    format -t "$cid" -c "$dir/server.properties" >"$dir/logs/format.out" 2>&1 ||
    { cat "$dir/logs/format.out" >&2; die "formatting $dir/data failed"; }
}

# Not running_pid: right after `&` the child may not have exec'd java yet.
alive() { kill -0 "$1" 2>/dev/null && [[ $(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# 0 ready, 1 died or timed out, 2 lost a port race (worth retrying).
wait_ready() {
  local dir=$1 pid=$2 deadline=$((SECONDS + START_TIMEOUT))
  while (( SECONDS < deadline )); do
    if ! alive "$pid"; then
      grep -qs 'Address already in use' "$dir/logs/server.log" "$dir/logs/kafka.out" && return 2
      WHY="exited during startup"
      return 1
    fi
    # "Kafka Server started" is logged only once the broker is unfenced and serving metadata.
    port_open "$BPORT" && grep -qs 'Kafka Server started' "$dir/logs/server.log" && return 0
    sleep 0.1
  done
  WHY="was not ready after ${START_TIMEOUT}s"
  return 1
}

cmd_start() {
  local dir pid attempt rc=1
  find_java
  mkdir -p "$1"
  dir=$(abs_dir "$1")
  if pid=$(running_pid "$dir"); then
    die "a broker is already running in $dir (pid $pid, bootstrap $(cat "$dir/bootstrap" 2>/dev/null))"
  fi
  cmd_fetch
  rm -f "$dir/bootstrap" "$dir/broker.pid"
  rm -rf "$dir/logs.prev"
  [[ -d $dir/logs ]] && mv "$dir/logs" "$dir/logs.prev"   # else the old "started" line would match
  for attempt in 1 2 3; do
    rm -rf "$dir/logs"   # a lost port race leaves a log of its own
    mkdir -p "$dir/logs"
    write_config "$dir"
    format_storage "$dir"
    java_props "$dir" server
    nohup "$JAVA" "${JVM_OPTS[@]}" -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      "${JPROPS[@]}" -cp "$LIB/*" kafka.Kafka "$dir/server.properties" \
      >"$dir/logs/kafka.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/broker.pid"
    if wait_ready "$dir" "$pid"; then rc=0; else rc=$?; fi
    [[ $rc == 2 ]] || break
    WHY="could not bind its ports (3 tries)"
    echo "broker.sh: port $BPORT or its controller port was taken meanwhile, retrying with new ports" >&2
  done
  if [[ $rc != 0 ]]; then
    echo "broker.sh: the broker in $dir $WHY; log tail:" >&2
    tail -n 40 "$dir/logs/server.log" "$dir/logs/kafka.out" >&2 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/broker.pid"
    exit 1
  fi
  echo "127.0.0.1:$BPORT" >"$dir/bootstrap"
  cat "$dir/bootstrap"
}

cmd_stop() {
  local dir pid _
  if ! dir=$(abs_dir "$1") || ! pid=$(running_pid "$dir"); then
    echo "not running"
    [[ -n ${dir:-} ]] && rm -f "$dir/broker.pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in {1..200}; do
    running_pid "$dir" >/dev/null || break
    sleep 0.1
  done
  if running_pid "$dir" >/dev/null; then
    echo "broker.sh: pid $pid ignored SIGTERM for 20s, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in {1..50}; do running_pid "$dir" >/dev/null || break; sleep 0.1; done
  fi
  rm -f "$dir/broker.pid"
  echo "stopped"
}

cmd_status() {
  local dir pid
  if dir=$(abs_dir "$1") && pid=$(running_pid "$dir"); then
    echo "running pid=$pid bootstrap=$(cat "$dir/bootstrap" 2>/dev/null || echo starting)"
  else
    echo "not running"
    return 3
  fi
}

case ${1:-} in
  fetch) [[ $# == 1 ]] || usage; find_java; cmd_fetch ;;
  start|stop|status) [[ $# == 2 ]] || usage; "cmd_$1" "$2" ;;
  *) usage ;;
esac
