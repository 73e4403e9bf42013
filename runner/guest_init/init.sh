#!/.kiln/busybox sh
# kiln guest init: PID 1 of every VM booted with `--init kiln` (the default).
#
# Mounts /proc, /sys, /dev and finds the host's channels; then /.kiln/agent takes the run's
# settings (hostname, machine id, time, seed, eth0, user, workdir, the environment, the
# argv) over the control channel (docs/run.md, "The control channel") — the kiln.control
# port on QEMU, vsock on Firecracker (kiln.ctl=vsock:PORT on the command line) — applies
# them and runs the workload as its child, its stdin/stdout/stderr on the virtio-serial
# ports; a cold Firecracker run's are the same frame on its disk (/.kiln/settings).
# Reports "exit N" on the kiln.status port (without one, as under Firecracker:
# "kiln-init: exit N" on the console); powers off. A stop request is an STP1
# frame on the kiln.control port (the agent reads it) or Ctrl-Alt-Del (Firecracker's only
# one, which the kernel turns into SIGINT for PID 1 once kernel.ctrl-alt-del is 0):
# either way the workload gets SIGTERM. Everything here runs through kiln's own busybox,
# so images without a shell work. The workload itself is always exec'd by absolute path:
# this busybox prefers its applets to files of the same name, and the image's `echo` must
# win over busybox's.
bb=/.kiln/busybox
say() { echo "kiln-init: $*" >/dev/console; }
status=""
finish() {
  if [ -n "$status" ]; then echo "exit $1" >"$status"; else say "exit $1"; fi
  $bb kill -TERM -1 2>/dev/null
  $bb kill -KILL -1 2>/dev/null
  $bb sync
  $bb mount -o remount,ro / 2>/dev/null
  echo o >/proc/sysrq-trigger
  $bb sleep 10
}
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
[ -e /dev/null ] || $bb mount -t devtmpfs devtmpfs /dev
[ -d /dev/pts ] || $bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts 2>/dev/null
$bb mount -t tmpfs -o mode=1777 shm /dev/shm 2>/dev/null

# The host's channels: virtio-serial ports by name (shell builtins only: every fork
# costs milliseconds under emulation). Firecracker has no such ports: there kiln puts
# kiln.ctl=vsock:PORT (warm) or kiln.ctl=file:/.kiln/settings (cold: the frame on the
# disk, which only that word makes the init read) on the command line — never a setting.
status="" out="" err="" in="" ctl=""
read -r cmdline </proc/cmdline
for a in $cmdline; do
  case "$a" in kiln.ctl=vsock:* | kiln.ctl=file:/.kiln/settings) ctl=${a#kiln.ctl=} ;; esac
done
i=0
serial=""  # no virtio-serial device (Firecracker, vsock or file): no ports to wait for
for d in /sys/bus/virtio/drivers/virtio_console/virtio*; do [ -e "$d" ] && serial=1; done
[ -n "$serial" ] || i=400
while [ "$i" -lt 400 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    read -r n <"$p/name"
    case "$n" in
      kiln.status) status=/dev/${p##*/} ;;
      kiln.stdout) out=/dev/${p##*/} ;;
      kiln.stderr) err=/dev/${p##*/} ;;
      kiln.stdin) in=/dev/${p##*/} ;;
      kiln.control) case "$ctl" in file:*) ;; *) ctl=/dev/${p##*/} ;; esac ;;
    esac
  done
  [ -n "$status" ] && [ -n "$ctl" ] && break
  i=$((i + 1))
  $bb usleep 5000
done
[ -n "$status" ] || say "no kiln.status port: the exit status goes to the console"
[ -n "$out" ] || out=/dev/console
[ -n "$err" ] || err=$out
[ -n "$in" ] || in=/dev/null

# Everything that needs no settings is done before the hello: after a warm restore every
# new code path is translated again under emulation (a fork+exec costs tens of ms then).
$bb ip link set lo up 2>/dev/null

# Ctrl-Alt-Del means "stop the workload" from the moment this shell starts it or the agent
# that will: SIGINT to this shell, counted by the trap (before, it reboots, which ends the
# VM); the child is SIGTERMed in the loop below — the agent passes that on to the workload,
# or ends with 143 when it comes before the settings.
stop=0 termed=0
stop_on_ctrl_alt_del() {
  trap 'stop=$((stop + 1))' INT
  echo 0 2>/dev/null >/proc/sys/kernel/ctrl-alt-del
}

agent=/.kiln/agent
child=""
if [ -n "$ctl" ] && [ -x "$agent" ]; then
  # The agent greets the host, blocks until its settings frame arrives (QEMU holds the
  # port's FIFO open: no EOF; on vsock it listens until the host connects), applies them
  # (seed, clock, hostname, machine id, eth0, user, workdir) and runs the workload as its
  # child with the ports as its stdin/stdout/stderr; it exits with the workload's status.
  # It also watches the QEMU port for STP1. Its own complaints go to the workload's stderr
  # (kiln run's; the console under Firecracker) and exit 125, 126 or 127.
  stop_on_ctrl_alt_del
  if [ "$err" = "$out" ]; then
    $agent run "$ctl" <"$in" >"$out" 2>&1 &
  else
    $agent run "$ctl" <"$in" >"$out" 2>"$err" &
  fi
  child=$!
else
  say "no settings: neither /.kiln/settings nor the kiln.control port and /.kiln/agent"
  finish 125
fi
while :; do
  if [ "$stop" -gt "$termed" ]; then
    termed=$stop
    say "stop requested (ctrl-alt-del)"
    kill -TERM "$child" 2>/dev/null  # the builtin: sent by PID 1, which the agent obeys
  fi
  wait "$child"
  rc=$?
  # A trapped signal cuts `wait` short with 128+2 while the workload runs on: SIGTERM
  # it (above) and wait again for its own status.
  [ "$rc" = 130 ] && [ "$stop" -gt "$termed" ] || break
done
say "workload exited $rc"
finish "$rc"
