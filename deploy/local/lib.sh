# shellcheck shell=bash
# shellcheck disable=SC2034  # variables used by the scripts that source this file
# Shared helpers for deploy/local/{up,down,canal-ctl,rabbit-ctl}. Sourced, not run.
#
# Environment:
#   CANAL_CONSUMER_STATE   runtime state (Canal jars, conf, logs, cursors; Python venv)
#                          default /var/tmp/canal-consumer
#   CANAL_LOCAL_PASSWD     Canal requires user "canal" with this password (default "canal";
#                          set it to an empty string to run Canal without client auth)
#   CANAL_SERVER_VERSION   Canal server modules to fetch from Maven Central (default 1.1.7)

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${CANAL_CONSUMER_STATE:-/var/tmp/canal-consumer}"
LOG_TAG="${LOG_TAG:-local}"
export CANAL_LOCAL_PASSWD="${CANAL_LOCAL_PASSWD-canal}"

CANAL_PORT=11111
CANAL_VERSION="${CANAL_SERVER_VERSION:-1.1.7}"
CANAL_HOME="$STATE/canal"
CANAL_LIB="$CANAL_HOME/lib-$CANAL_VERSION"
CANAL_PID="$CANAL_HOME/bin/canal.pid"
CANAL_MAIN="local.canalconsumer.CanalLocalServer"
RABBIT_PORT=5672
# Our broker is the Debian package's node: this name and this pid file. Any other RabbitMQ node
# on the machine (another name, other ports) is left alone by every script here.
RABBIT_NODE="rabbit@$(hostname -s)"
RABBIT_PID_FILE=/var/run/rabbitmq/pid
MARIADB_PORT=3306
MARIADB_PID_FILE=/run/mysqld/mysqld.pid
CELERY_PIN="celery==5.6.3"

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts system services)"; }

# Listening TCP socket on PORT? (asks the kernel; does not connect, so no log noise in the server)
port_listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
port_closed() { ! port_listening "$1"; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_until() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  while ! "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

# --- Debian packages -------------------------------------------------------------------------

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

APT_UPDATED=0
# apt_install PKG...: installs the ones missing; runs apt-get update first (once per process).
apt_install() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  need_root
  log "installing Debian packages: ${missing[*]}"
  if [ "$APT_UPDATED" -eq 0 ]; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# Packages per component (used by up to install everything in one apt run).
MARIADB_PKGS=(mariadb-server mariadb-client)
RABBIT_PKGS=(rabbitmq-server)
python_pkgs() { command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null || echo python3 python3-venv; }
java_pkgs() {
  local need=()
  command -v java >/dev/null 2>&1 && command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
  command -v mvn >/dev/null 2>&1 || need+=(maven)
  echo "${need[@]}"
}

# install_file SRC DST: copy when different; returns 0 if it changed the file, 1 if not.
install_file() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then return 1; fi
  mkdir -p "$(dirname "$2")"
  cp "$1" "$2"
  return 0
}

have_service_script() { [ -x "/etc/init.d/$1" ]; }

# --- MariaDB -----------------------------------------------------------------------------------

mariadb_alive() { mysqladmin --no-defaults --protocol=socket --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1; }

mariadb_start() {
  mariadb_alive && return 0
  need_root
  install -d -o mysql -g mysql /run/mysqld /var/log/mysql
  if [ ! -d /var/lib/mysql/mysql ]; then
    # normally done by the package's postinst; needed if the data directory was wiped
    log "initialising the MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null 2>&1 || die "mariadb-install-db failed"
  fi
  log "starting MariaDB"
  if have_service_script mariadb; then
    (close_inherited_fds; service mariadb start >/dev/null 2>&1) || true
  fi
  if ! mariadb_alive; then
    # no init script or it gave up: run the server the way the init script does
    (close_inherited_fds; setsid nohup /usr/bin/mysqld_safe >/dev/null 2>&1 </dev/null &)
  fi
  if ! wait_until 90 "MariaDB to answer ping" mariadb_alive; then
    tail -n 40 /var/log/mysql/error.log >&2 2>/dev/null || true
    die "MariaDB did not start"
  fi
}

# The pid of the server answering on our socket, from the pid file it writes (pid-file in the
# Debian configuration), or fails.
mariadb_pid() {
  local pid
  pid=$(cat "$MARIADB_PID_FILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" || return 1
  echo "$pid"
}

mariadb_stop() {
  mariadb_alive || return 0
  local pid
  pid=$(mariadb_pid) || pid=""
  log "stopping MariaDB${pid:+ (pid $pid)}"
  if have_service_script mariadb; then
    service mariadb stop >/dev/null 2>&1 || true
  fi
  if mariadb_alive; then
    mysqladmin --no-defaults --protocol=socket --socket=/run/mysqld/mysqld.sock shutdown >/dev/null 2>&1 || true
  fi
  wait_until 60 "MariaDB to stop answering" bash -c "! mysqladmin --no-defaults --protocol=socket --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1" \
    || die "MariaDB did not stop"
  if [ -n "$pid" ]; then
    wait_until 60 "MariaDB (pid $pid) to exit" pid_gone "$pid" || die "MariaDB (pid $pid) did not exit"
  fi
}

mariadb_sql() { mariadb --protocol=socket -uroot -N -B "$@"; }

# --- Canal -------------------------------------------------------------------------------------

# pid_alive PID: the process exists and is not a zombie (an exited child that an init without
# reaping, e.g. `sleep` as PID 1 of a namespace, never collects).
pid_alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

pid_gone() { ! pid_alive "$1"; }

canal_pid() { # prints the pid of our running Canal server, or fails
  local pid
  [ -f "$CANAL_PID" ] || return 1
  pid=$(cat "$CANAL_PID" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$CANAL_MAIN" || return 1
  echo "$pid"
}

# --- RabbitMQ ----------------------------------------------------------------------------------

rabbit_port_open() { port_listening "$RABBIT_PORT"; }

# rabbitmqctl for our node only (-n), whatever else runs on the machine.
rabbitctl() { rabbitmqctl -n "$RABBIT_NODE" "$@"; }

# The pid of our broker's Erlang VM, from its pid file, or fails. A pid file left behind by a
# crashed node names a pid that is gone (or reused by something that is not an Erlang VM).
rabbit_pid() {
  local pid
  pid=$(cat "$RABBIT_PID_FILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = beam.smp ] || return 1
  echo "$pid"
}

# The pid our node reports for itself (when the pid file is missing), or fails.
rabbit_node_pid() {
  local out
  out=$(timeout 15 rabbitmqctl -n "$RABBIT_NODE" -q eval 'os:getpid().' 2>/dev/null) || return 1
  out=${out//\"/}
  [[ "$out" =~ ^[0-9]+$ ]] || return 1
  echo "$out"
}

rabbit_node_running() { rabbit_pid >/dev/null || rabbit_node_pid >/dev/null; }

# --- daemons (ZooKeeper, the Canal cluster) ---------------------------------------------------

# spawn_daemon PIDFILE LOGFILE DIR CMD...: starts CMD in DIR as a daemon (own session, stdin
# closed, stdout/stderr appended to LOGFILE) and writes its pid to PIDFILE. Descriptors above 2
# are closed first: a daemon must not inherit a lock held by the caller (`flock -o` forgets to
# close nothing, but a plain `flock` would hand the lock to the daemon forever).
spawn_daemon() {
  local pidfile=$1 logfile=$2 dir=$3; shift 3
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")" "$dir"
  (
    cd "$dir"
    close_inherited_fds
    LANG=C.UTF-8 setsid nohup "$@" >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_exec $!
  )
}

# wait_exec PID: waits (up to 5 s) until the child forked by this shell has exec'd its command.
# Until then its command line is still the script's, and a check by command line
# (pid_from_file) would take a starting daemon for one that died (seen on a loaded machine).
wait_exec() {
  local self i
  self=$(readlink "/proc/$BASHPID/exe")
  for ((i = 0; i < 100; i++)); do
    [ "$(readlink "/proc/$1/exe" 2>/dev/null)" != "$self" ] && return 0
    sleep 0.05
  done
}

# close_inherited_fds: in a subshell that starts a daemon, closes every descriptor above 2 (a
# caller's `flock FILE deploy/local/up` lock among them: a daemon holding it would keep the
# lock taken for as long as it runs).
close_inherited_fds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then
      eval "exec $fd>&-" 2>/dev/null || true
    fi
  done
}

# pid_from_file PIDFILE MARKER: prints the pid in PIDFILE if that process runs and its command
# line contains MARKER (a reused pid is not ours), or fails.
pid_from_file() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  echo "$pid"
}

# stop_pid PID WHAT SECS: SIGTERM, wait up to SECS, then SIGKILL.
stop_pid() {
  local pid=$1 what=$2 secs=$3
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + secs))
  while pid_alive "$pid"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$what still running after ${secs}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_until 10 "$what (pid $pid) to exit" pid_gone "$pid" || true
      break
    fi
    sleep 0.1
  done
}

# --- ZooKeeper (Debian's package, run by deploy/local/zk-ctl) ---------------------------------

ZK_PORT=2181
ZK_HOME="$STATE/zookeeper"
ZK_PID="$ZK_HOME/zookeeper.pid"
ZK_MAIN="org.apache.zookeeper.server.quorum.QuorumPeerMain"
ZK_PKGS=(zookeeper libslf4j-java) # slf4j-simple.jar: its log binding

zk_pid() { pid_from_file "$ZK_PID" "$ZK_HOME/conf/zoo.cfg"; }

# "imok" to ZooKeeper's ruok four-letter command (whitelisted in our zoo.cfg).
zk_ok() {
  local reply
  reply=$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_PORT && printf ruok >&3 && cat <&3" 2>/dev/null) || return 1
  [ "$reply" = imok ]
}

# --- the local Canal cluster (deploy/local/canal-ha-ctl): servers 1 and 2 ----------------------

CANAL_HA_DESTINATION=example
canal_ha_port() { echo $((11120 + $1)); }
canal_ha_home() { echo "$STATE/canal-ha/$1"; }
canal_ha_pidfile() { echo "$(canal_ha_home "$1")/bin/canal.pid"; }
canal_ha_pid() { pid_from_file "$(canal_ha_pidfile "$1")" "-Dcanal.port=$(canal_ha_port "$1")"; }
