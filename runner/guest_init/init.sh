#!/.kiln/busybox sh
# kiln guest init: PID 1 of every VM booted with `--init kiln` (the default).
#
# Mounts /proc, /sys, /dev and finds the host's channels; then /.kiln/agent takes the run's
# settings (hostname, machine id, time, seed, eth0, user, workdir, the environment, the
# argv) over the control channel (docs/run.md, "The control channel") — the kiln.control
# port on QEMU, vsock on Firecracker (kiln.ctl=vsock:PORT on the command line) — applies
# them and runs the workload as its child, its stdin/stdout/stderr on the virtio-serial
# ports; a cold Firecracker run takes them from /.kiln/config and the command line, and
# this shell does the same. Reports "exit N" on the kiln.status port (without one, as under
# Firecracker: "kiln-init: exit N" on the console); powers off. A stop request is an STP1
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
# kiln.ctl=vsock:PORT on the command line (only where the channel is: never a setting).
status="" out="" err="" in="" ctl=""
read -r cmdline </proc/cmdline
for a in $cmdline; do
  case "$a" in kiln.ctl=vsock:*) ctl=${a#kiln.ctl=} ;; esac
done
i=0
case "$ctl" in vsock:*) i=400 ;; esac
while [ "$i" -lt 400 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    read -r n <"$p/name"
    case "$n" in
      kiln.status) status=/dev/${p##*/} ;;
      kiln.stdout) out=/dev/${p##*/} ;;
      kiln.stderr) err=/dev/${p##*/} ;;
      kiln.stdin) in=/dev/${p##*/} ;;
      kiln.control) ctl=/dev/${p##*/} ;;
    esac
  done
  # the settings come over kiln.control unless they are on the disk (Firecracker)
  [ -n "$status" ] && { [ -n "$ctl" ] || [ -e /.kiln/config ]; } && break
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

# A cold Firecracker run's settings: /.kiln/config and the kernel command line (the shell
# does what the agent does for the channel; docs/run.md).
start_from_config() {
  KILN_MAC="" KILN_IP="" KILN_GW="" KILN_DNS="" KILN_MACHINE_ID=""
  . /.kiln/config || { say "cannot read /.kiln/config"; finish 125; }
  # The network on the kernel command line (Firecracker): kiln.ip=ADDR/PREFIX kiln.gw=GW
  # [kiln.dns=A,B]. The kernel leaves dotted unknown words alone.
  for a in $cmdline; do
    case "$a" in
      kiln.ip=*) KILN_IP=${a#kiln.ip=} ;;
      kiln.gw=*) KILN_GW=${a#kiln.gw=} ;;
      kiln.dns=*) KILN_DNS=${a#kiln.dns=} ;;
    esac
  done
  echo "$KILN_HOSTNAME" >/proc/sys/kernel/hostname || say "cannot set the hostname"
  if [ -n "$KILN_MACHINE_ID" ] && [ -d /etc ]; then
    echo "$KILN_MACHINE_ID" >/etc/machine-id 2>/dev/null || say "cannot write /etc/machine-id"
  fi
  # eth0: without CONFIG_IP_PNP nobody else configures it. virtio_net is loaded by kiln's
  # initrd, so eth0 exists by now (or within a moment).
  if [ -n "$KILN_IP" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 200 ]; do
      i=$((i + 1))
      $bb usleep 10000
    done
    [ -z "$KILN_MAC" ] || $bb ip link set eth0 address "$KILN_MAC" || say "cannot set eth0's MAC $KILN_MAC"
    if $bb ip addr add "$KILN_IP" dev eth0 && $bb ip link set eth0 up; then
      [ -z "$KILN_GW" ] || $bb ip route add default via "$KILN_GW" || say "cannot add the route via $KILN_GW"
      say "eth0 $KILN_IP"
    else
      say "cannot configure eth0 with $KILN_IP"
    fi
    if [ -n "$KILN_DNS" ] && { [ -w /etc/resolv.conf ] || [ ! -e /etc/resolv.conf ]; }; then
      : >/etc/resolv.conf 2>/dev/null
      IFS=,
      for d in $KILN_DNS; do echo "nameserver $d" >>/etc/resolv.conf 2>/dev/null; done
      unset IFS
    fi
  fi

  # The user: NAME|UID[:GROUP|GID], resolved in the image's own /etc/passwd and /etc/group
  # (read with builtins: no awk, no fork).
  lookup() { # FILE KEY -> sets f1 f3 f4 f6 from the first line whose name or id is KEY
    f1="" f3="" f4="" f6=""
    [ -r "$1" ] || return 1
    while IFS=: read -r a _ c d _ e _; do
      if [ "$a" = "$2" ] || [ "$c" = "$2" ]; then
        f1=$a f3=$c f4=$d f6=$e
        return 0
      fi
    done <"$1"
    return 1
  }
  isnum() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }
  u=${KILN_USER%%:*}
  g=""
  case "$KILN_USER" in *:*) g=${KILN_USER#*:} ;; esac
  [ -n "$u" ] || u=0
  if lookup /etc/passwd "$u"; then
    uid=$f3 gid=$f4 home=$f6
  elif isnum "$u"; then
    uid=$u gid=0 home=/
  else
    echo "kiln: unable to find user $u: no matching entries in passwd file" >"$err"
    finish 126
  fi
  if [ -n "$g" ]; then
    if lookup /etc/group "$g"; then
      gid=$f3
    elif isnum "$g"; then
      gid=$g
    else
      echo "kiln: unable to find group $g: no matching entries in group file" >"$err"
      finish 126
    fi
  fi
  [ -n "$home" ] || home=/

  # "$@" is: ENV... -- ARGV... (env entries always contain "=", so "--" is unambiguous).
  [ "$KILN_HAS_HOME" = 1 ] || set -- "HOME=$home" "$@"
  n=0
  for a in "$@"; do
    [ "$a" = "--" ] && break
    n=$((n + 1))
  done
  m=$(($# - n - 2))
  if [ "$m" -lt 0 ]; then
    echo "kiln: no command to run" >"$err"
    finish 126
  fi
  # Rotate ENV... to the end, dropping "--" and keeping argv[0] aside: ARGS... ENV...
  i=0
  while [ "$i" -lt "$n" ]; do set -- "$@" "$1"; shift; i=$((i + 1)); done
  shift
  cmd=$1
  shift

  if [ -n "$KILN_WORKDIR" ]; then
    $bb mkdir -p "$KILN_WORKDIR" 2>/dev/null
    cd "$KILN_WORKDIR" || { echo "kiln: cannot enter working directory $KILN_WORKDIR" >"$err"; finish 126; }
  fi
  case "$cmd" in
    */*) prog=$cmd ;;
    *)
      prog=""
      IFS=:
      for d in $KILN_PATH; do
        if [ -f "$d/$cmd" ] && [ -x "$d/$cmd" ]; then
          prog="$d/$cmd"
          break
        fi
      done
      unset IFS
      ;;
  esac
  if [ -z "$prog" ]; then
    echo "kiln: $cmd: executable file not found in \$PATH" >"$err"
    finish 127
  fi
  # ARGS... ENV... [nsenter -S UID -G GID] PROG, then ARGS rotated behind: ENV... PROG ARGS...
  if [ "$uid" = 0 ] && [ "$gid" = 0 ]; then
    set -- "$@" "$prog"
  else
    set -- "$@" "$bb" nsenter -S "$uid" -G "$gid" "$prog"
  fi
  i=0
  while [ "$i" -lt "$m" ]; do set -- "$@" "$1"; shift; i=$((i + 1)); done
  stop_on_ctrl_alt_del
  say "starting $prog"
  if [ "$err" = "$out" ]; then
    $bb env -i "$@" <"$in" >"$out" 2>&1 &
  else
    $bb env -i "$@" <"$in" >"$out" 2>"$err" &
  fi
  child=$!
}

agent=/.kiln/agent
child=""
if [ -e /.kiln/config ]; then
  start_from_config
elif [ -n "$ctl" ] && [ -x "$agent" ]; then
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
  say "no settings: neither /.kiln/config nor the kiln.control port and /.kiln/agent"
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
