#!/usr/bin/env bash
# Two "nodes" on one machine for DeepSpeed's default (pdsh over ssh) launcher: sshd
# listening on 127.0.0.1 and 127.0.0.2, a passwordless key, and a hostfile naming both.
#
#   bash tools/loopback_nodes.sh            # set up (idempotent) and print the launch command
#   bash tools/loopback_nodes.sh status     # is our sshd running, on which port
#   bash tools/loopback_nodes.sh stop       # stop our sshd (the ~/.ssh/config block stays)
#   bash tools/loopback_nodes.sh remove     # stop it and remove the ~/.ssh/config block
#
# What it changes: installs openssh-server and pdsh with apt-get when missing (needs
# root); creates the key ~/.ssh/rskdist_loopback (once) and adds it to
# ~/.ssh/authorized_keys (once); appends one marked block "Host 127.0.0.1 127.0.0.2" to
# ~/.ssh/config (rewritten in place on later runs, the rest of the file is kept); starts
# its own sshd (not the system service) on a free port with its files in STATE.
# STATE (default ~/.rskdist-loopback) holds sshd_config, sshd.pid, sshd.log, hostfile.
# Only the first matching value counts in ~/.ssh/config: if an earlier block sets Port
# for these hosts, the script says so.
set -euo pipefail
STATE=${STATE:-$HOME/.rskdist-loopback}
KEY=$HOME/.ssh/rskdist_loopback
CONFIG=$HOME/.ssh/config
BEGIN="# >>> rskdist loopback nodes >>>"
END="# <<< rskdist loopback nodes <<<"
SSHD=${SSHD:-/usr/sbin/sshd}
PY=${PY:-python3}

running_pid() {  # prints the pid of our sshd when it is alive
  local pid
  [ -f "$STATE/sshd.pid" ] || return 1
  pid=$(cat "$STATE/sshd.pid")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid" && echo "stopped sshd (pid $pid)"
  else
    echo "no rskdist loopback sshd running"
  fi
  rm -f "$STATE/sshd.pid"
}

remove_block() {  # drop the marked block from ~/.ssh/config, keep everything else
  [ -f "$CONFIG" ] || return 0
  awk -v b="$BEGIN" -v e="$END" '$0==b{skip=1;next} $0==e{skip=0;next} !skip' "$CONFIG" > "$CONFIG.tmp"
  cat "$CONFIG.tmp" > "$CONFIG" && rm -f "$CONFIG.tmp"
}

case "${1:-setup}" in
  stop) stop; exit 0 ;;
  remove) stop; remove_block; echo "removed the block from $CONFIG"; exit 0 ;;
  status)
    if pid=$(running_pid); then echo "sshd pid $pid, port $(cat "$STATE/port"), hostfile $STATE/hostfile"
    else echo "not running"; exit 1; fi
    exit 0 ;;
  setup) ;;
  *) echo "usage: $0 [setup|status|stop|remove]" >&2; exit 2 ;;
esac

# 1. packages
if ! [ -x "$SSHD" ] || ! command -v pdsh >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "needs openssh-server and pdsh: run as root, or: sudo apt-get install -y openssh-server pdsh" >&2
    exit 1
  fi
  echo "== apt-get install openssh-server pdsh"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server pdsh >/dev/null
fi
command -v "$PY" >/dev/null || { echo "needs $PY (to pick a free port); set PY=" >&2; exit 1; }

# 2. key and authorized_keys
mkdir -p "$HOME/.ssh" "$STATE"
chmod 700 "$HOME/.ssh"
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -C rskdist-loopback -f "$KEY"
touch "$HOME/.ssh/authorized_keys"
chmod 600 "$HOME/.ssh/authorized_keys"
grep -qxF "$(cat "$KEY.pub")" "$HOME/.ssh/authorized_keys" || cat "$KEY.pub" >> "$HOME/.ssh/authorized_keys"

# 3. our own sshd on a free port (kept when already running)
if pid=$(running_pid); then
  PORT=$(cat "$STATE/port")
  echo "== sshd already running (pid $pid, port $PORT)"
else
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  [ -f "$STATE/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/host_ed25519"
  cat > "$STATE/sshd_config" <<EOF
# rskdist loopback nodes: written by tools/loopback_nodes.sh
Port $PORT
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $STATE/host_ed25519
PidFile $STATE/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
EOF
  mkdir -p /run/sshd 2>/dev/null || true  # privilege separation directory
  "$SSHD" -f "$STATE/sshd_config" -E "$STATE/sshd.log"
  echo "$PORT" > "$STATE/port"
  for _ in 1 2 3 4 5 6 7 8 9 10; do running_pid >/dev/null && break; sleep 0.2; done
  pid=$(running_pid) || { echo "sshd did not start; see $STATE/sshd.log" >&2; exit 1; }
  echo "== started sshd (pid $pid) on 127.0.0.1 and 127.0.0.2 port $PORT"
fi

# 4. ~/.ssh/config: one marked block, replaced on every run
touch "$CONFIG"
chmod 600 "$CONFIG"
remove_block
cat >> "$CONFIG" <<EOF
$BEGIN
Host 127.0.0.1 127.0.0.2
  Port $PORT
  IdentityFile $KEY
  StrictHostKeyChecking no
  UserKnownHostsFile $STATE/known_hosts
  LogLevel ERROR
$END
EOF
resolved=$(ssh -G 127.0.0.2 | awk '$1=="port"{print $2}')
[ "$resolved" = "$PORT" ] || echo "warning: ssh resolves 127.0.0.2 to port $resolved, not $PORT: an earlier block in $CONFIG sets Port; move ours above it" >&2

# 5. check and hostfile
ssh -T -o BatchMode=yes 127.0.0.2 true </dev/null || { echo "ssh to 127.0.0.2 failed; see $STATE/sshd.log" >&2; exit 1; }
printf '127.0.0.1 slots=1\n127.0.0.2 slots=1\n' > "$STATE/hostfile"
cat <<EOF
== ready: ssh 127.0.0.1 and 127.0.0.2 reach this machine through port $PORT
Two-"node" launch (one process per "node"; pick a free master port):
  PDSH_RCMD_TYPE=ssh .venv/bin/deepspeed --hostfile $STATE/hostfile --num_nodes 2 --num_gpus 1 \\
      --master_addr 127.0.0.1 --master_port 29533 rskdist/train.py --config configs/debug.yaml
Stop sshd:   bash tools/loopback_nodes.sh stop      (or: kill \$(cat $STATE/sshd.pid))
Undo all:    bash tools/loopback_nodes.sh remove    (key and authorized_keys line stay)
EOF
