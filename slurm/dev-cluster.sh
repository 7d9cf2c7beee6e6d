#!/usr/bin/env bash
# A real two-node SLURM cluster on one machine: munged, slurmctld and one slurmd per node, all started by this
# script as root from a private state directory. It exists for tml's SLURM tests and for trying
# `python launch/slurm.py` on a laptop; it is not a production setup (no accounting, no cgroups, root jobs).
#
# usage: bash slurm/dev-cluster.sh install|up|down|status|env
#   install  apt-get the daemons (Debian/Ubuntu: slurmctld slurmd slurm-client munge); needs root
#   up       start the cluster (seconds; the nodes need up to a minute on a slow machine), print its environment
#   down     cancel jobs, then stop exactly the daemons `up` started (by the PIDs in their pid files)
#   status   sinfo + squeue
#   env      print the `export` lines that point slurm commands at this cluster: eval "$(bash ... env)"
#
# Environment (all optional):
#   TML_SLURM_DIR   state directory (default ${TMPDIR:-/tmp}/tml-slurm-dev); two clusters need two directories
#   TML_SLURM_NODES number of nodes (default 2)
#   TML_SLURM_CPUS  CPUs each node advertises (default: all of this machine's; nodes share them)
#   TML_SLURM_MEM_MB memory each node advertises (default 1000; memory is not a scheduled resource here)
#   TML_SLURM_PORT  slurmctld port; slurmd ports follow it (default 16817 -> slurmd 16818, 16819, ...)
#
# Pitfalls this script works around (each cost someone an afternoon):
# - Every node is "nodeK" and must resolve to this machine, but we do not want to edit the real /etc/hosts.
#   The daemons therefore run in a private mount namespace (unshare -m) where /etc/hosts is a bind-mounted copy
#   with the node names added. Jobs are children of slurmd, so they see the same names.
# - Several slurmd on one address need distinct ports, and slurmd must bind 127.0.0.1 rather than 0.0.0.0
#   (CommunicationParameters=NoInAddrAny), otherwise the second slurmd fails with "Address already in use".
# - There is no slurmdbd, so the real `sacct` only answers "accounting storage is disabled". Submitit polls
#   sacct to notice finished or failed jobs, so `up` writes a small sacct stand-in backed by `scontrol show job`
#   into $TML_SLURM_DIR/bin, which `env` puts first on PATH.
# - Debian's packages try to start the daemons through systemd on install; in containers that either fails or
#   is refused by policy-rc.d. That is what we want: this script starts them itself, with its own config.
# - No cgroups: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none work inside containers.
# - MinJobAge keeps finished jobs visible to `scontrol show job` (and so to the sacct stand-in) for 10 minutes.
set -euo pipefail

STATE_DIR=${TML_SLURM_DIR:-${TMPDIR:-/tmp}/tml-slurm-dev}
NODES=${TML_SLURM_NODES:-2}
CPUS=${TML_SLURM_CPUS:-$(nproc)}
MEM_MB=${TML_SLURM_MEM_MB:-1000}
CTLD_PORT=${TML_SLURM_PORT:-16817}
CONF=$STATE_DIR/etc/slurm.conf
# Seconds a requeued job waits before it may start again (SLURM's cred_expire; 120 on real clusters): short so
# that the requeue tests finish quickly, long enough for a job step credential to reach a busy slurmd.
REQUEUE_DELAY_S=10
MUNGE_SOCKET=$STATE_DIR/munge/run/munge.socket
export SLURM_CONF=$CONF

log() { echo "[dev-cluster $(date +%T)] $*" >&2; }

# Polls a command five times a second until it succeeds or the time (seconds) runs out.
wait_for() {
  local seconds=$1; shift
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

# Starts a daemon (which forks and writes its pid file) inside a mount namespace whose /etc/hosts knows nodeK.
in_node_namespace() {
  unshare --mount --propagation private sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$STATE_DIR/etc/hosts" "$@"
}

do_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  slurmctld -V
  munged --version
}

write_config() {
  { cat /etc/hosts; for i in $(seq 1 "$NODES"); do echo "127.0.0.1 node$i"; done; } > "$STATE_DIR/etc/hosts"
  cat > "$CONF" <<EOF
# Written by slurm/dev-cluster.sh: $NODES nodes on this machine, state in $STATE_DIR
ClusterName=tmldev
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$REQUEUE_DELAY_S
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
CommunicationParameters=NoInAddrAny
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule within a second of submission: tests wait on this.
SchedulerParameters=sched_interval=1,batch_sched_delay=0
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or preempted: the time a training
# loop has to save its checkpoint. Real clusters use 30 to 120.
KillWait=10
MinJobAge=600
# Reject at submission what can never run (a partition's node or time limits) instead of leaving it pending.
EnforcePartLimits=ALL
EOF
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeHostname=node$i NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" >> "$CONF"
    mkdir -p "$STATE_DIR/spool/node$i"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$CONF"
}

# Submitit asks `sacct -o JobID,State,NodeList --parsable2 -j ID ...`; answer it from `scontrol show job`.
write_sacct_stand_in() {
  mkdir -p "$STATE_DIR/bin"
  cat > "$STATE_DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in for a cluster without slurmdbd (slurm/dev-cluster.sh): JobID|State|NodeList from scontrol.
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) IFS=, read -ra listed <<< "$2"; ids+=("${listed[@]}"); shift 2 ;;
    -j*) IFS=, read -ra listed <<< "${1#-j}"; ids+=("${listed[@]}"); shift ;;
    --jobs=*) IFS=, read -ra listed <<< "${1#--jobs=}"; ids+=("${listed[@]}"); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for id in "${ids[@]}"; do
  scontrol show job -o "$id" 2>/dev/null | awk '{
    delete f
    for (i = 1; i <= NF; i++) { k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v); f[k] = v }
    jid = ("ArrayTaskId" in f) ? f["ArrayJobId"] "_" f["ArrayTaskId"] : f["JobId"]
    print jid "|" f["JobState"] "|" f["NodeList"] }'
done
EOF
  chmod +x "$STATE_DIR/bin/sacct"
}

do_up() {
  if [ -e "$STATE_DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$STATE_DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "already up (state in $STATE_DIR); run down first"; exit 1
  fi
  for daemon in munged slurmctld slurmd; do
    command -v "$daemon" >/dev/null || { log "$daemon not found: run 'bash $0 install' (as root) first"; exit 1; }
  done
  # munged refuses a socket below a directory that not everyone may search (pytest's 0700 tmp dirs, say).
  local dir
  dir=$(dirname "$(realpath -m "$STATE_DIR")")
  while [ "$dir" != / ]; do
    if [ -d "$dir" ] && [ "$(( 0$(stat -c %a "$dir") & 01 ))" = 0 ]; then
      log "$dir is not searchable by others (mode $(stat -c %a "$dir")); munged needs that: pick another TML_SLURM_DIR"
      exit 1
    fi
    dir=$(dirname "$dir")
  done
  rm -rf "$STATE_DIR"
  mkdir -p "$STATE_DIR"/{etc,state,spool,log,run,munge/key,munge/run}
  # munged insists on a private key directory and a socket directory others can traverse.
  chmod 700 "$STATE_DIR/munge/key"; chmod 755 "$STATE_DIR/munge/run"
  dd if=/dev/urandom of="$STATE_DIR/munge/key/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE_DIR/munge/key/munge.key"
  munged --key-file="$STATE_DIR/munge/key/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$STATE_DIR/munge/run/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/key/munged.seed"
  wait_for 10 munge -S "$MUNGE_SOCKET" -n || { log "munged did not start"; cat "$STATE_DIR/log/munged.log"; exit 1; }
  write_config
  write_sacct_stand_in
  in_node_namespace slurmctld -f "$CONF"
  wait_for 20 scontrol ping || { log "slurmctld did not start"; cat "$STATE_DIR/log/slurmctld.log"; exit 1; }
  for i in $(seq 1 "$NODES"); do in_node_namespace slurmd -f "$CONF" -N "node$i"; done
  if ! wait_for 60 bash -c "[ \"\$(sinfo -h -t idle -o %D)\" = $NODES ]"; then
    log "nodes did not become idle"; sinfo -N -l; tail -n 30 "$STATE_DIR"/log/*.log; exit 1
  fi
  sinfo -N
  log "up; to use it from this shell: eval \"\$(bash $0 env)\""
  do_env
}

do_env() {
  echo "export SLURM_CONF=$CONF PATH=$STATE_DIR/bin:\$PATH"
}

do_down() {
  if [ -e "$CONF" ] && scontrol ping >/dev/null 2>&1; then
    scancel --full --user root 2>/dev/null || true
    # Let cancelled jobs finish so that no slurmstepd outlives its slurmd (at most 15 s).
    for _ in $(seq 75); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local pid_file pid started=()
  # slurmd first, then slurmctld, then munged: SIGTERM each, wait up to 10 s, SIGKILL what is left.
  for pid_file in "$STATE_DIR"/run/slurmd-*.pid "$STATE_DIR/run/slurmctld.pid" "$STATE_DIR/munge/run/munged.pid"; do
    [ -e "$pid_file" ] || continue
    pid=$(cat "$pid_file"); rm -f "$pid_file"
    if kill "$pid" 2>/dev/null; then started+=("$pid"); log "stopped pid $pid ($(basename "$pid_file"))"; fi
  done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${started[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for pid in "${started[@]}"; do kill -0 "$pid" 2>/dev/null && { log "SIGKILL pid $pid"; kill -9 "$pid" || true; }; done
  # A slurmstepd of this cluster that outlived its slurmd (normally none): recognised by SLURM_CONF in its environ.
  for pid in $(pgrep -x slurmstepd || true); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
      log "stopped stray slurmstepd $pid"; kill -9 "$pid" || true
    fi
  done
}

case "${1:-}" in
  install) do_install ;;
  up) do_up ;;
  down) do_down ;;
  status) sinfo -N; squeue ;;
  env) do_env ;;
  *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
