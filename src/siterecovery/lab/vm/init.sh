#!/bin/sh
# /init of a lab VM guest (siterecovery.lab.vm): a real Linux whose data disk /dev/vda is the
# machine's agent NBD export. It keeps a log of numbered, checksummed files on ext4 and reports
# to the host on the serial console, one line per event, each starting "SR ":
#   SR BOOT <uptime>                  the kernel reached /init
#   SR READY                          sr.mode=probe: booted, powering off (the host's KVM probe)
#   SR MKFS                           a blank disk got a new file system
#   SR PREFSCK rc=<n> recovery=<0|1>  e2fsck -fn on the disk as found, before any mount (no
#                                     journal replay); recovery=1: the journal needed replaying
#   SR FSCK rc=<n>                    e2fsck -fn after mount replayed the journal (what a reboot does)
#   SR fsck: <line>                   e2fsck's findings when rc is not 0
#   SR VERDICT ok=<0|1> records=<n> torn=<0|1> first_bad=<n> files=<n> quiesce=<a,b,..> reason=<word>
#   SR LISTENING                      commands are read from now on: freeze, thaw, stop
#   SR FLUSHED <n>                    file n and its directory entry are durable (fsync'd)
#   SR QUIESCED <n> | SR THAWED       fsfreeze -f / -u of the file system; n is the marker file
#   SR FULL <n>                       the file system is full: the guest stops writing
#   SR STOPPED clean|umount-failed    after "stop": writer ended, file system unmounted, powering off
#   SR BENCH <what> <bytes> <ms>      sr.mode=bench: dd oflag=direct throughput on the raw disk
#   SR FAIL <what>                    something the guest cannot work around
# Log file n is named N.K.SHA256 (K: d data, q quiesce marker) and starts with the line
# "SRFILE <machine> <n> <K>" followed by random bytes; SHA256 covers the whole file, so a torn,
# stale or foreign file is found by hashing alone (one sha256sum over the folder).
# busybox's sh runs its own applets before PATH: e2fsprogs are called by full path.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
stty -echo 2>/dev/null   # what the host types must not come back into our report lines
say() { echo "SR $*"; }
say BOOT "$(cut -d' ' -f1 /proc/uptime)"
MACHINE=lab; RATE=16; MODE=log; BYTES=3968
for w in $(cat /proc/cmdline); do
  case "$w" in
    sr.machine=*) MACHINE=${w#sr.machine=} ;;
    sr.rate=*) RATE=${w#sr.rate=} ;;
    sr.mode=*) MODE=${w#sr.mode=} ;;
    sr.bytes=*) BYTES=${w#sr.bytes=} ;;
  esac
done
if [ "$MODE" = probe ]; then say READY; poweroff -f; fi
for m in $(cat /etc/modules); do insmod "/$m" 2>/dev/null; done   # virtio (ext4 is built in)
DISK=/dev/vda
i=0; while [ ! -b $DISK ] && [ $i -lt 400 ]; do usleep 50000; i=$((i+1)); done
[ -b $DISK ] || { say FAIL "no $DISK"; poweroff -f; }
ms() { cut -d' ' -f1 /proc/uptime | tr -d .; }   # 10 ms ticks

if [ "$MODE" = bench ]; then
  # Random data (zeros would become holes on the agent side), written with O_DIRECT (busybox dd
  # has no oflag=dsync): 64 MiB in 1 MiB blocks, then 8 MiB in 4 KiB blocks, one at a time.
  dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null
  t0=$(ms); i=0; ok=1
  while [ $i -lt 4 ]; do dd if=/tmp/pat of=$DISK bs=1M seek=$((i*16)) oflag=direct 2>/dev/null || ok=0; i=$((i+1)); done
  t1=$(ms); [ $ok = 1 ] && say BENCH write-direct-1M $((64*1048576)) $(( (t1-t0)*10 )) || say FAIL dd-1M
  t0=$(ms)
  if dd if=/tmp/pat of=$DISK bs=4k count=2048 oflag=direct 2>/dev/null; then
    t1=$(ms); say BENCH write-direct-4k $((2048*4096)) $(( (t1-t0)*10 ))
  else say FAIL dd-4k; fi
  say STOPPED clean; poweroff -f
fi

idle() { while read -r cmd; do [ "$cmd" = stop ] && break; done; say STOPPED "$1"; poweroff -f; }
mkdir -p /mnt
if [ "$(dd if=$DISK bs=64k count=1 2>/dev/null | tr -d '\000' | wc -c)" -eq 0 ]; then
  /bin/mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 $DISK && say MKFS
else
  # First the disk exactly as found: an app-consistent point needs no journal replay.
  rec=0; /bin/dumpe2fs -h $DISK 2>/dev/null | grep -q needs_recovery && rec=1
  /bin/e2fsck -fn $DISK > /tmp/fsck.out 2>&1; say PREFSCK rc=$? recovery=$rec
  # Then what a reboot after a crash does: mount replays the journal; a full read-only check.
  if mount -t ext4 $DISK /mnt; then umount /mnt; else say FAIL mount-for-replay; fi
  /bin/e2fsck -fn $DISK > /tmp/fsck.out 2>&1; rc=$?
  say FSCK rc=$rc
  [ $rc -eq 0 ] || sed 's/^/SR fsck: /' /tmp/fsck.out | head -20
fi
if ! mount -t ext4 -o data=ordered $DISK /mnt; then
  say VERDICT ok=0 records=0 torn=0 first_bad=1 files=0 quiesce= reason=mount-failed
  say LISTENING; idle no-filesystem
fi
mkdir -p /mnt/log
cd /mnt/log || { say FAIL log-folder; poweroff -f; }

# The oracle: files 1..n whole, at most one torn or missing file after them, nothing beyond.
set -- $(ls | grep -q . && sha256sum * 2>/dev/null | awk '
  { n = split($2, p, "."); seq = p[1] + 0; files++
    if (n == 3 && p[1] ~ /^[0-9]+$/ && (p[2] == "d" || p[2] == "q") && p[3] == $1 && !(seq in good)) {
      good[seq] = p[2]
    } else { bad[seq] = 1 }
    if (seq > top) top = seq }
  END { r = 0; while ((r + 1) in good) r++
    torn = ((r + 1) in bad) ? 1 : 0; ok = 1; why = "clean"
    if (torn) why = "torn-tail"
    for (s in good) if (s + 0 > r + 1 || (s + 0 == r + 1 && (r + 1) in bad)) { ok = 0; why = "file-" s "-after-a-prefix-of-" r }
    for (s in bad) if (s + 0 > r + 1 || s + 0 <= r) { ok = 0; why = "file-" s "-bad-after-a-prefix-of-" r }
    q = ""; for (s = 1; s <= r; s++) if (good[s] == "q") q = q (q == "" ? "" : ",") s
    if (q == "") q = "-"
    print ok, r, torn, r + 1, files + 0, q, why }')
[ $# -eq 7 ] || set -- 1 0 0 1 0 - empty
say VERDICT ok=$1 records=$2 torn=$3 first_bad=$4 files=$5 quiesce=$6 reason=$7
seq=$2
[ "$3" = 1 ] && rm -f ./"$(($2 + 1))".* && sync .   # the torn file is written again

put() {  # put N KIND: write file N, fsync it and the folder
  { echo "SRFILE $MACHINE $1 $2"; head -c "$BYTES" /dev/urandom; } > /tmp/f
  set -- "$1" "$2" $(sha256sum /tmp/f)
  dd if=/tmp/f of="$1.$2.$3" bs=64k conv=fsync 2>/dev/null && sync .
}
writer() {
  while [ ! -e /tmp/stop ]; do
    if [ -e /tmp/freeze ]; then
      seq=$((seq + 1)); put $seq q && say FLUSHED $seq
      fsfreeze --freeze /mnt && say QUIESCED $seq
      while [ -e /tmp/freeze ] && [ ! -e /tmp/stop ]; do usleep 20000; done
      fsfreeze --unfreeze /mnt; say THAWED
      continue
    fi
    if ! put $((seq + 1)) d; then
      say FULL $seq
      while [ ! -e /tmp/stop ]; do usleep 100000; done
      break
    fi
    seq=$((seq + 1)); say FLUSHED $seq
    [ "$RATE" -gt 0 ] && usleep $((1000000 / RATE))
  done
}
writer &
wpid=$!
say LISTENING
while read -r cmd; do
  case "$cmd" in
    freeze) touch /tmp/freeze ;;
    thaw) rm -f /tmp/freeze ;;
    stop) break ;;
  esac
done
touch /tmp/stop; rm -f /tmp/freeze; wait $wpid
cd /
if umount /mnt; then say STOPPED clean; else say STOPPED umount-failed; fi
poweroff -f
