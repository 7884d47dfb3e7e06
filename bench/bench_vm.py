"""Real Linux VM lab guests: boot time, the DR cycle's time, and in-guest O_DIRECT throughput.

- boot: QEMU start to the guest's /init (`SR READY`, probe mode, no disk), median of 3, under TCG
  and under KVM where KVM can boot the guest (`lab image` probes it);
- cycle: `siterecovery demo --guest vm`'s cycle (enable → planned failover → reprotect → failback →
  change point → re-protect), every service a real process, the file-system oracle after each move;
- throughput: inside the guest, `dd oflag=direct` of 64 MiB random data in 1 MiB blocks and of
  8 MiB in 4 KiB blocks (one request at a time) on its virtio disk, when that disk is (a) the lab machine's
  agent export with replication on (agent → process server → master target), (b) a plain export
  of an image with nothing behind it, (c) a plain raw file opened by QEMU itself.

Prints a table and writes `bench/results/vm.md`. Run with `python -m bench.bench_vm`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.plane import report
from siterecovery.demo.cycle import Cycle
from siterecovery.demo.environment import Environment
from siterecovery.fabrics.lab_model import Accel, GuestKind
from siterecovery.lab import runtime
from siterecovery.lab.vm.image import (
    GuestImage,
    boot_once,
    ensure_image,
    file_drive,
    nbd_drive,
    probe_kvm,
    qemu_command,
)

RESULTS = Path(__file__).resolve().parent / "results" / "vm.md"


def _bench_guest(image: GuestImage, drive: list[str]) -> dict[str, tuple[int, int]]:
    """Boot the guest in bench mode on `drive`; {what: (bytes, milliseconds)}."""
    cmd = qemu_command(image.kernel, image.initrd, Accel.TCG, "sr.mode=bench", drive)
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600).stdout
    found = {}
    for line in out.splitlines():
        words = line[line.find("SR ") :].split() if "SR BENCH" in line else []
        if len(words) == 5:
            found[words[2]] = (int(words[3]), int(words[4]))
    if not found:
        raise RuntimeError(f"the guest reported no figures:\n{out[-1500:]}")
    return found


def _mbs(figure: tuple[int, int]) -> str:
    size, ms = figure
    return f"{size / max(ms, 1) / 1000:.1f} MB/s"


def _export(image_file: Path, sock_dir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "siterecovery.lab.export",
            "--unix-dir",
            str(sock_dir),
            "--disk",
            f"d={image_file}",
        ]
    )
    deadline = time.monotonic() + 60
    while not (sock_dir / "d.sock").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the export did not start")
        time.sleep(0.05)
    return proc


def main() -> int:
    image = ensure_image()
    rows: list[tuple[str, ...]] = []
    tcg = [boot_once(image, Accel.TCG, 120) for _ in range(3)]
    rows.append(("boot to /init, TCG (median of 3)", f"{statistics.median(s for _, s, _ in tcg):.1f} s"))
    kvm = probe_kvm(image)
    if kvm.kvm:
        boots = [boot_once(image, Accel.KVM, 60) for _ in range(3)]
        rows.append(
            ("boot to /init, KVM (median of 3)", f"{statistics.median(s for _, s, _ in boots):.1f} s")
        )
    else:
        rows.append(("boot to /init, KVM", f"n/a: {kvm.reason[:60]}"))
    with tempfile.TemporaryDirectory(prefix="bench-vm-") as tmp:
        work = Path(tmp)
        env = Environment(work / "dr", disk_size=64 << 20, guest=GuestKind.VM, accel=Accel.TCG)
        try:
            env.start()
            cycle = Cycle(env, "web1")
            started = time.monotonic()
            cycle.run()
            rows.append(("DR cycle on a VM guest (6 steps)", f"{time.monotonic() - started:.0f} s"))
            for row in cycle.rows:
                rows.append((f"  {row.step}", f"{row.seconds:.1f} s ({row.oracle or 'sync'})"))
            # Web1 is protected again: stop its guest, keep its agent (and replication) running.
            run = runtime.run_dir(env.lab_dir, "onprem", "web1")
            runtime._stop(run / "guest.pid", 120)
            replicated = _bench_guest(image, nbd_drive(run / "nbd" / "disk0.sock", "disk0"))
        finally:
            env.stop()
        plain_image = work / "plain.img"
        plain_image.write_bytes(b"")
        subprocess.run(["truncate", "-s", "64M", str(plain_image)], check=True)
        export = _export(plain_image, work / "nbd")
        try:
            exported = _bench_guest(image, nbd_drive(work / "nbd" / "d.sock", "d"))
        finally:
            export.terminate()
            export.wait(30)
        local = _bench_guest(image, file_drive(plain_image))
    for what in ("write-direct-1M", "write-direct-4k"):
        for where, got in (
            ("agent export, replication on", replicated),
            ("plain export, no replication", exported),
            ("plain raw file", local),
        ):
            rows.append((f"in-guest dd {what}, {where}", _mbs(got[what])))
    note = (
        "\nTCG unless stated (`lab image` shows whether KVM boots the guest here). Throughput is "
        "measured inside the guest with busybox dd and /proc/uptime (10 ms resolution)."
    )
    report(RESULTS, "VM lab guests", ["figure", "value"], rows, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
