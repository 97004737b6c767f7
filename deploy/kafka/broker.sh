#!/usr/bin/env bash
# Single-node KRaft Kafka broker for tests, CI and demos: plain `java` on jars
# that Maven fetched into lib/ (see pom.xml). Usage: see usage() or README.md.
#
# Listeners, each on its own port of 127.0.0.1 (ports are chosen on the first start
# and kept in DIR/ports, so `stop DIR` + `start DIR` comes back on the same ports with
# the same data; only a port taken meanwhile by another process makes start pick new ones):
#   PLAINTEXT       no security; `start` prints its host:port as its LAST stdout line,
#                   also in DIR/bootstrap (tests and tools parse these).
#   SASL_PLAINTEXT  SASL mechanism PLAIN. One user, defined in the listener's JAAS config
#                   in server.properties: DIR/sasl.username ("interneg") with the random
#                   password in DIR/sasl.password (made on the first start, then kept).
#                   host:port in DIR/sasl.bootstrap; DIR/sasl.env has the INTERNEG_KAFKA__*
#                   variables for it (`set -a; . DIR/sasl.env; set +a`).
#                   Failed logins are logged as "Failed authentication with ..." in
#                   DIR/logs/server.log.
#   SSL             only where `openssl` is on PATH: TLS with client certificates required.
#                   A throwaway CA signs the broker's certificate (SAN IP:127.0.0.1,
#                   DNS:localhost) and a client certificate: DIR/ssl/ca.pem, DIR/ssl/client.pem,
#                   DIR/ssl/client.key (unencrypted). host:port in DIR/ssl.bootstrap,
#                   variables in DIR/ssl.env. Without openssl these files are absent.
#   CONTROLLER      KRaft's own, PLAINTEXT; the broker talks to itself over PLAINTEXT.
#
# ACL mode (`KAFKA_ACLS=1 broker.sh start DIR`, remembered by DIR: a later plain `start DIR`
# stays in it) is a broker as production runs it, and nothing above applies:
#   SASL_SSL        the only listener for clients (first port of DIR/ports): TLS with the
#                   throwaway CA (needs openssl), SASL mechanism SCRAM-SHA-512. One SCRAM user
#                   per role, interneg-{admin,camera,scoring,inversion,events,operator}, created when
#                   the storage is formatted, random passwords in DIR/acl/ROLE.password and
#                   the INTERNEG_KAFKA__* variables in DIR/acl/ROLE.env. host:port is the last
#                   stdout line and DIR/bootstrap.
#   INTERNAL, CONTROLLER  the broker's own (third and fourth ports): TLS with client
#                   certificates required; the broker's certificate (CN=interneg-test-server)
#                   is its principal. The second port is not used.
#   StandardAuthorizer: super users are the broker and interneg-admin (topics, ACLs); every
#   other principal may do only what the ACL file allows (KAFKA_ACL_FILE, default
#   deploy/kafka/acls), synced onto the broker by `start` and by `broker.sh acls DIR`
#   (which takes a changed file without a restart). Syncing uses kafka-python
#   (KAFKA_PYTHON, default the repository's .venv/bin/python, else python3): Kafka's
#   ACL tool is not among the broker's jars.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
LIB=$HERE/lib
MAX_BYTES=${KAFKA_MAX_MESSAGE_BYTES:-16777216}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-60}
# C1-only JIT: ready in ~3 s instead of ~4.5 s on 2 cores; fast enough for test traffic.
read -ra JVM_OPTS <<<"${KAFKA_JVM_OPTS:--Xmx512m -Xms128m -XX:TieredStopAtLevel=1}"

ACL_FILE=${KAFKA_ACL_FILE:-$HERE/acls}
ACL_ROLES=(admin camera scoring inversion events operator)
# The principal the broker's certificate gives it on its own TLS listeners (ACL mode).
BROKER_PRINCIPAL="User:CN=interneg-test-server"

die() { echo "broker.sh: $*" >&2; exit 1; }

[[ $MAX_BYTES =~ ^[0-9]+$ ]] || die "KAFKA_MAX_MESSAGE_BYTES must be a number of bytes, not '$MAX_BYTES'"

usage() {
  cat >&2 <<'EOF'
usage: broker.sh fetch        fetch jars into lib/ (no-op when up to date)
       broker.sh start DIR    start a broker with its state in DIR; prints host:port
                              (PLAINTEXT; SASL and SSL listeners: DIR/sasl.*, DIR/ssl.*)
       broker.sh stop DIR     stop it (SIGTERM, SIGKILL after 20 s); idempotent
       broker.sh status DIR   "running pid=N bootstrap=host:port" or "not running" (exit 3)
       broker.sh acls DIR     ACL mode: make the running broker's ACLs those of the ACL file
env:   KAFKA_MAX_MESSAGE_BYTES (16777216)  KAFKA_START_TIMEOUT (60 s)  JAVA_HOME
       KAFKA_JVM_OPTS (-Xmx512m -Xms128m -XX:TieredStopAtLevel=1)
       KAFKA_VERSION (overrides the version in pom.xml; refetches lib/)
       KAFKA_ACLS=1 (start a new DIR in ACL mode: SASL_SSL + SCRAM-SHA-512, StandardAuthorizer)
       KAFKA_ACL_FILE (deploy/kafka/acls)  KAFKA_PYTHON (python with kafka-python, for ACLs)
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
# Arguments: ports already chosen, to avoid.
pick_port() {
  local p _ taken=" $* "
  for _ in {1..100}; do
    p=$((20000 + RANDOM % 12000))
    [[ $taken != *" $p "* ]] && ! port_open "$p" && { echo "$p"; return 0; }
  done
  die "no free TCP port found on 127.0.0.1"
}

# Sets BPORT SPORT TPORT CPORT (PLAINTEXT, SASL_PLAINTEXT, SSL, CONTROLLER). A restart
# reuses DIR/ports, so clients configured with the old addresses reconnect; $2=fresh
# (after a lost port race) picks new ones.
choose_ports() {
  local dir=$1 fresh=${2:-} saved=()
  [[ -z $fresh && -f $dir/ports ]] && read -ra saved <"$dir/ports"
  if [[ ${#saved[@]} == 4 ]]; then
    BPORT=${saved[0]} SPORT=${saved[1]} TPORT=${saved[2]} CPORT=${saved[3]}
    return 0
  fi
  BPORT=$(pick_port)
  SPORT=$(pick_port "$BPORT")
  TPORT=$(pick_port "$BPORT" "$SPORT")
  CPORT=$(pick_port "$BPORT" "$SPORT" "$TPORT")
  echo "$BPORT $SPORT $TPORT $CPORT" >"$dir/ports"
}

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

# The SASL/PLAIN user: made once per DIR, kept across restarts. Hex passwords need no
# quoting inside the JAAS string.
ensure_sasl_user() {
  local dir=$1
  [[ -s $dir/sasl.username ]] || echo interneg >"$dir/sasl.username"
  [[ -s $dir/sasl.password ]] || (umask 077; random_hex 16 >"$dir/sasl.password")
  SASL_USER=$(<"$dir/sasl.username")
  SASL_PASSWORD=$(<"$dir/sasl.password")
}

# A throwaway CA, the broker's key + chain (PEM keystore) and a client certificate,
# made once per DIR with openssl (EC P-256: milliseconds). No openssl: no SSL listener.
ensure_ssl_files() {
  local ssl=$1/ssl
  SSL_ON=
  command -v openssl >/dev/null || return 0
  if [[ ! -s $ssl/server.keystore.pem ]]; then
    rm -rf "$ssl.tmp" && mkdir -p "$ssl.tmp"
    (
      set -e
      cd "$ssl.tmp"
      umask 077
      key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
      key ca.key
      openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=interneg-test-ca" -out ca.pem 2>/dev/null
      for who in server client; do
        key "$who.key"
        openssl req -new -key "$who.key" -subj "/CN=interneg-test-$who" -out "$who.csr" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >"$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
          -extfile "$who.ext" -out "$who.pem" 2>/dev/null
      done
      # Kafka's PEM keystore: an unencrypted PKCS#8 key followed by the certificate chain.
      openssl pkcs8 -topk8 -nocrypt -in server.key -out server.pk8
      cat server.pk8 server.pem ca.pem >server.keystore.pem
      rm -f ./*.csr ./*.ext ./*.srl server.pk8 server.key ca.key
    ) >"$1/logs/ssl.out" 2>&1 || { cat "$1/logs/ssl.out" >&2; rm -rf "$ssl.tmp"; die "openssl could not make the SSL files"; }
    rm -rf "$ssl" && mv "$ssl.tmp" "$ssl"
  fi
  SSL_ON=1
}

# The default listeners: PLAINTEXT, SASL_PLAINTEXT (PLAIN) and, with openssl, SSL.
write_listeners() {
  local dir=$1 listeners advertised protocols
  listeners="PLAINTEXT://127.0.0.1:$BPORT,SASL_PLAINTEXT://127.0.0.1:$SPORT"
  protocols="PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [[ -n $SSL_ON ]]; then
    listeners+=",SSL://127.0.0.1:$TPORT"
    protocols+=",SSL:SSL"
  fi
  advertised=$listeners
  listeners+=",CONTROLLER://127.0.0.1:$CPORT"
  cat >"$dir/server.properties" <<EOF
# Written by broker.sh start (ports from $dir/ports).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
# SASL/PLAIN users (user_NAME="PASSWORD") for the SASL_PLAINTEXT listener only.
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER="$SASL_PASSWORD";
EOF
  [[ -n $SSL_ON ]] && cat >>"$dir/server.properties" <<EOF
# TLS with client certificates, both signed by the throwaway CA in $dir/ssl.
listener.name.ssl.ssl.keystore.type=PEM
listener.name.ssl.ssl.keystore.location=$dir/ssl/server.keystore.pem
listener.name.ssl.ssl.truststore.type=PEM
listener.name.ssl.ssl.truststore.location=$dir/ssl/ca.pem
listener.name.ssl.ssl.client.auth=required
EOF
  return 0
}

# ACL mode: clients only on SASL_SSL (SCRAM-SHA-512); the broker reaches itself over TLS
# listeners that require a client certificate, so no listener lets anyone in unauthenticated.
write_acl_listeners() {
  local dir=$1
  cat >"$dir/server.properties" <<EOF
# Written by broker.sh start in ACL mode (ports from $dir/ports; the second is unused).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
listeners=SASL_SSL://127.0.0.1:$BPORT,INTERNAL://127.0.0.1:$TPORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=SASL_SSL://127.0.0.1:$BPORT,INTERNAL://127.0.0.1:$TPORT
inter.broker.listener.name=INTERNAL
listener.security.protocol.map=SASL_SSL:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL
# The SCRAM users are in the cluster metadata (made at format time); the login module
# only has to be named.
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
# Every listener serves the broker's certificate (throwaway CA in $dir/ssl), and the broker
# shows the same one as a client to its INTERNAL and CONTROLLER listeners, which require
# one: its principal there is $BROKER_PRINCIPAL.
ssl.keystore.type=PEM
ssl.keystore.location=$dir/ssl/server.keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$dir/ssl/ca.pem
listener.name.internal.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# The broker (inter-broker and controller requests) and the admin (topics, ACLs) may do
# anything; everyone else only what an ACL allows. A resource with no ACL is closed
# (Kafka's default, stated here because the whole mode depends on it).
super.users=$BROKER_PRINCIPAL;User:interneg-admin
allow.everyone.if.no.acl.found=false
EOF
}

write_config() {
  local dir=$1 sock=104857600
  # Kafka's default request cap (100 MiB) already fits; only raise it, never lower it.
  (( MAX_BYTES + 1048576 > sock )) && sock=$((MAX_BYTES + 1048576))
  if [[ -n $ACLS ]]; then
    write_acl_listeners "$dir"
  else
    write_listeners "$dir"
  fi
  cat >>"$dir/server.properties" <<EOF
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

# What clients need for the secured listeners, written once the broker is ready (and, in
# ACL mode, its ACLs are in place).
write_client_files() {
  local dir=$1 role
  if [[ -n $ACLS ]]; then
    for role in "${ACL_ROLES[@]}"; do
      (umask 077; cat >"$dir/acl/$role.env" <<EOF
INTERNEG_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$BPORT
INTERNEG_KAFKA__SECURITY_PROTOCOL=SASL_SSL
INTERNEG_KAFKA__SASL_MECHANISM=SCRAM-SHA-512
INTERNEG_KAFKA__SASL_PLAIN_USERNAME=interneg-$role
INTERNEG_KAFKA__SASL_PLAIN_PASSWORD=$(<"$dir/acl/$role.password")
INTERNEG_KAFKA__SSL_CAFILE=$dir/ssl/ca.pem
EOF
      )
    done
    return 0
  fi
  echo "127.0.0.1:$SPORT" >"$dir/sasl.bootstrap"
  (umask 077; cat >"$dir/sasl.env" <<EOF
INTERNEG_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$SPORT
INTERNEG_KAFKA__SECURITY_PROTOCOL=SASL_PLAINTEXT
INTERNEG_KAFKA__SASL_MECHANISM=PLAIN
INTERNEG_KAFKA__SASL_PLAIN_USERNAME=$SASL_USER
INTERNEG_KAFKA__SASL_PLAIN_PASSWORD=$SASL_PASSWORD
EOF
  )
  if [[ -n $SSL_ON ]]; then
    echo "127.0.0.1:$TPORT" >"$dir/ssl.bootstrap"
    cat >"$dir/ssl.env" <<EOF
INTERNEG_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$TPORT
INTERNEG_KAFKA__SECURITY_PROTOCOL=SSL
INTERNEG_KAFKA__SSL_CAFILE=$dir/ssl/ca.pem
INTERNEG_KAFKA__SSL_CERTFILE=$dir/ssl/client.pem
INTERNEG_KAFKA__SSL_KEYFILE=$dir/ssl/client.key
EOF
  fi
}

# Sets ACLS (1: ACL mode). A DIR keeps the mode it was formatted in: its SCRAM users and
# ACLs live in its metadata, and a plain broker on it would ignore them (everything open).
choose_mode() {
  local dir=$1 want=${KAFKA_ACLS:-}
  [[ $want =~ ^[01]?$ ]] || die "KAFKA_ACLS must be 1 or 0, not '$want'"
  ACLS=
  if [[ -d $dir/acl ]]; then
    [[ $want == 0 ]] && die "$dir was made in ACL mode (it has acl/): start it without KAFKA_ACLS=0, or use a new DIR"
    ACLS=1
  elif [[ $want == 1 ]]; then
    [[ -f $dir/data/meta.properties ]] && die "$dir was formatted without ACLs: ACL mode needs a new DIR"
    ACLS=1
  fi
  return 0
}

# One SCRAM user per role, made once per DIR (the storage tool puts them in the cluster
# metadata at format time). Hex passwords need no quoting in --add-scram.
ensure_acl_users() {
  local dir=$1 role
  [[ -n $SSL_ON ]] || die "ACL mode needs openssl (its listeners are all TLS)"
  mkdir -p "$dir/acl" && chmod 700 "$dir/acl"
  for role in "${ACL_ROLES[@]}"; do
    [[ -s $dir/acl/$role.password ]] && continue
    # A password made now would not match the credentials formatted into the metadata.
    [[ -f $dir/data/meta.properties ]] && die "$dir/acl/$role.password is missing; its SCRAM user cannot be recovered: use a new DIR"
    (umask 077; random_hex 16 >"$dir/acl/$role.password")
  done
}

# kafka-python syncs the ACLs: Kafka's own ACL tool is not among the broker's jars.
find_python() {
  if [[ -n ${KAFKA_PYTHON:-} ]]; then
    PYTHON=$KAFKA_PYTHON
  elif [[ -x $HERE/../../.venv/bin/python ]]; then
    PYTHON=$HERE/../../.venv/bin/python
  else
    PYTHON=$(command -v python3) || die "ACL mode needs Python with kafka-python: set KAFKA_PYTHON"
  fi
  "$PYTHON" -c 'import kafka.admin' 2>/dev/null ||
    die "ACL mode needs kafka-python, but $PYTHON cannot import kafka.admin: set KAFKA_PYTHON"
}

# Makes the broker's ACLs exactly those of $ACL_FILE (stale ones are deleted, so a line
# removed from the file is revoked), as interneg-admin over SASL_SSL; then waits until the
# broker answers with that set (it applies them from the metadata log a moment after the
# controller commits them). Arguments: DIR, bootstrap host:port. Summary in DIR/logs/acls.out.
sync_acls() {
  local dir=$1 bootstrap=$2
  [[ -f $ACL_FILE ]] || die "no ACL file at $ACL_FILE (KAFKA_ACL_FILE)"
  # The password goes through the environment, not argv (which `ps` shows to everyone).
  KAFKA_ACL_ADMIN_PASSWORD=$(<"$dir/acl/admin.password") \
    "$PYTHON" - "$ACL_FILE" "$bootstrap" "$dir/ssl/ca.pem" >"$dir/logs/acls.out" 2>&1 <<'PY' ||
import os, re, sys, time

import kafka.errors as Errors
from kafka.admin import (ACL, ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType,
                         KafkaAdminClient, ResourcePattern, ResourcePatternFilter, ResourceType)

path, bootstrap, cafile = sys.argv[1:4]
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
OPERATIONS = {op.name for op in ACLOperation} - {"UNKNOWN", "ANY"}


def fail(message):
    sys.exit(f"{path}: {message}")


def parse(n, raw):
    where = f"line {n}"

    def value(match):
        got = os.environ.get(match.group(1)) or match.group(2)
        if not got:
            fail(f"{where}: ${{{match.group(1)}}} is not set and has no default")
        return got

    fields = VAR.sub(value, raw.split("#", 1)[0]).split()
    if not fields:
        return None
    if len(fields) != 5:
        fail(f"{where}: want PRINCIPAL OPERATION RESOURCE-TYPE PATTERN NAME, got {raw.strip()!r}")
    principal, operation, kind, pattern, name = fields
    if not principal.startswith("User:") or principal == "User:":
        fail(f"{where}: the principal must be User:NAME, not {principal!r}")
    if operation not in OPERATIONS:
        fail(f"{where}: unknown operation {operation!r} (one of {', '.join(sorted(OPERATIONS))})")
    if kind not in ("TOPIC", "GROUP", "TRANSACTIONAL_ID", "CLUSTER"):
        fail(f"{where}: unknown resource type {kind!r} (TOPIC, GROUP, TRANSACTIONAL_ID or CLUSTER)")
    if pattern not in ("LITERAL", "PREFIXED"):
        fail(f"{where}: the pattern must be LITERAL or PREFIXED, not {pattern!r}")
    if kind == "CLUSTER" and (pattern, name) != ("LITERAL", "kafka-cluster"):
        fail(f"{where}: the cluster is LITERAL kafka-cluster")
    return ACL(principal, "*", ACLOperation[operation], ACLPermissionType.ALLOW,
               ResourcePattern(ResourceType[kind], name, ACLResourcePatternType[pattern]))


with open(path) as f:
    wanted = {acl for n, raw in enumerate(f, 1) if (acl := parse(n, raw)) is not None}
admin = KafkaAdminClient(bootstrap_servers=[bootstrap], client_id="broker.sh-acls", security_protocol="SASL_SSL",
                         sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="interneg-admin",
                         sasl_plain_password=os.environ["KAFKA_ACL_ADMIN_PASSWORD"], ssl_cafile=cafile)
every = ACLFilter(None, None, ACLOperation.ANY, ACLPermissionType.ANY,
                  ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))
try:
    present = set(admin.describe_acls(every)[0])
    missing, stale = wanted - present, present - wanted
    if missing:
        refused = admin.create_acls(sorted(missing, key=repr))["failed"]
        if refused:
            fail(f"the broker refused {len(refused)} ACL(s): {refused}")
    if stale:
        errors = [error for _, _, error in admin.delete_acls(sorted(stale, key=repr)) if error is not Errors.NoError]
        if errors:
            fail(f"the broker could not delete stale ACLs: {errors}")
    deadline = time.monotonic() + 30
    while set(admin.describe_acls(every)[0]) != wanted:
        if time.monotonic() > deadline:
            fail("the broker did not show the file's ACLs within 30 s")
        time.sleep(0.1)
finally:
    admin.close()
print(f"{len(wanted)} ACLs from {path}: {len(missing)} added, {len(stale)} removed")
PY
    { cat "$dir/logs/acls.out" >&2; return 1; }
}

# $2 names the log file: the storage tool and the broker each get their own.
java_props() {
  JPROPS=("-Dkafka.logs.dir=$1/logs" "-Dkafka.log.name=$2" "-Dlog4j2.configurationFile=$HERE/log4j2.properties")
}

format_storage() {
  local dir=$1 cid role scram=()
  # Restarting in the same DIR keeps its topics (and, via DIR/ports, its ports).
  [[ -f $dir/data/meta.properties ]] && return 0
  # ACL mode: the SCRAM users go into the metadata now, so that even the admin can log in
  # on the first start. (The passwords are in the storage tool's argv for a second, once per DIR.)
  if [[ -n $ACLS ]]; then
    (umask 077; : >"$dir/logs/format.out")   # the tool prints the users' SCRAM keys there
    for role in "${ACL_ROLES[@]}"; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=interneg-$role,password=$(<"$dir/acl/$role.password")]")
    done
  fi
  # A cluster id is 16 random bytes in URL-safe base64; Kafka refuses ones starting with '-'.
  cid=-
  while [[ $cid == -* ]]; do cid=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='); done
  java_props "$dir" format
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 "${JPROPS[@]}" -cp "$LIB/*" kafka.tools.StorageTool \
    format -t "$cid" -c "$dir/server.properties" "${scram[@]}" >"$dir/logs/format.out" 2>&1 ||
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
  choose_mode "$dir"
  cmd_fetch
  rm -f "$dir/bootstrap" "$dir/sasl.bootstrap" "$dir/ssl.bootstrap" "$dir/sasl.env" "$dir/ssl.env" "$dir/broker.pid"
  rm -f "$dir"/acl/*.env
  rm -rf "$dir/logs.prev"
  [[ -d $dir/logs ]] && mv "$dir/logs" "$dir/logs.prev"   # else the old "started" line would match
  mkdir -p "$dir/logs"
  ensure_ssl_files "$dir"
  if [[ -n $ACLS ]]; then
    ensure_acl_users "$dir"
    find_python   # before the broker starts: without it the ACLs could not be synced
  else
    ensure_sasl_user "$dir"
  fi
  for attempt in 1 2 3; do
    rm -rf "$dir/logs/server.log"* "$dir/logs/kafka.out"   # a lost port race leaves a log of its own
    choose_ports "$dir" "$([[ $attempt == 1 ]] || echo fresh)"
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
    echo "broker.sh: one of the ports $BPORT $SPORT $TPORT $CPORT was taken by another process, retrying with new ports" >&2
  done
  # A broker whose ACLs are not those of the file is not started (it is stopped again).
  if [[ $rc == 0 && -n $ACLS ]] && ! sync_acls "$dir" "127.0.0.1:$BPORT"; then
    rc=1
    WHY="could not be given the ACLs of $ACL_FILE (above)"
  fi
  if [[ $rc != 0 ]]; then
    echo "broker.sh: the broker in $dir $WHY; log tail:" >&2
    tail -n 40 "$dir/logs/server.log" "$dir/logs/kafka.out" >&2 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/broker.pid"
    exit 1
  fi
  write_client_files "$dir"
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

# Sync a running ACL-mode broker's ACLs with the ACL file (after the file, or the INTERNEG_*
# variables it names, changed).
cmd_acls() {
  local dir pid
  dir=$(abs_dir "$1") && pid=$(running_pid "$dir") && [[ -s $dir/bootstrap ]] || die "no broker is running in $1"
  [[ -d $dir/acl ]] || die "the broker in $dir is not in ACL mode (KAFKA_ACLS=1 with a new DIR)"
  find_python
  sync_acls "$dir" "$(<"$dir/bootstrap")" || die "the ACLs of $dir were not synced (above)"
  cat "$dir/logs/acls.out"
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
  start|stop|status|acls) [[ $# == 2 ]] || usage; "cmd_$1" "$2" ;;
  *) usage ;;
esac
