#!/usr/bin/env bash
# One bulk run through one socksd, with the server's syscalls counted (perf tracepoints) and the
# CPU of the server, the target (connload serve) and the client, per GB. Used for the splice
# profile in bench/results/2026-12-03-splice-8up.md.
#   PYTHONPATH=$PWD/src bench/splice_counts.sh up 8 3                # splice (default auto)
#   PYTHONPATH=$PWD/src bench/splice_counts.sh up 8 3 --splice off   # the copying relay
# Needs perf and connload (bench/connect_bench.py builds it into ~/.cache/socksd-bench).
# Loopback only; ports PORT_BASE..PORT_BASE+3 (default 21540); every process is stopped by PID.
set -euo pipefail
dir=${1:?up|down}; clients=${2:?clients}; dur=${3:?seconds}; shift 3
base=${PORT_BASE:-21540}
cl=${CONNLOAD:-$HOME/.cache/socksd-bench/connload}
out=$(mktemp -d)
"$cl" serve --echo $((base + 1)) --sink $((base + 2)) --source $((base + 3)) --max-seconds $((dur + 30)) \
    >/dev/null 2>&1 &
tpid=$!
python3 -m socksd serve --listen 127.0.0.1:$base --access-log off "$@" >"$out/server.log" 2>&1 &
spid=$!
trap 'kill $spid $tpid 2>/dev/null || true' EXIT
sleep 0.8
port=$((base + 2)); [ "$dir" = down ] && port=$((base + 3))
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ev=syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_wait
ev=$ev,syscalls:sys_enter_splice,syscalls:sys_enter_read,syscalls:sys_enter_write
s0=$(ticks $spid); k0=$(ticks $tpid)
timeout $((dur + 10)) perf stat -x, -e "$ev" -p $spid -o "$out/perf.txt" -- sleep $((dur + 1)) &
ppid=$!
"$cl" bulk -T 127.0.0.1:$port -p 127.0.0.1:$base -c "$clients" -d "$dur" -w 0.5 --dir "$dir" \
    >"$out/load.json" 2>/dev/null
wait $ppid
s1=$(ticks $spid); k1=$(ticks $tpid)
hz=$(getconf CLK_TCK)
python3 - "$out" $((s1 - s0)) $((k1 - k0)) "$hz" <<'PY'
import json, sys
out, server, target, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
load = json.loads([ln for ln in open(f"{out}/load.json") if ln.startswith("{")][-1])
gb = load["bytes_total"] / 1e9
print(f"MB/s {load['MBps']:.0f}  server CPU-s/GB {server / hz / gb:.3f}  target {target / hz / gb:.3f}"
      f"  client {load['client_cpu_s'] / gb:.3f}")
for line in open(f"{out}/perf.txt"):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].isdigit() and int(f[0]):
        print(f"  {f[2].split(':')[-1][10:]:<12} {int(f[0]) / gb:8.0f} per GB")
PY
rm -rf "$out"
