"""Delta resync: 2 GiB image after 1 % was rewritten in scattered 4 KiB writes, vs rsync.

Source and target start identical (random data); then 1 % of the source is rewritten in scattered
4 KiB writes. Timed: our delta resync (agent → process server → master target, mutual TLS, both
ends hashing 1 MiB/4 KiB block digests; from assigning it to the running services, as in the
product), `rsync -I --inplace --no-whole-file` of the same change (bytes on the wire from
`--stats`), and reading the allocated data once (`cat > /dev/null`). Every timed run starts cold
the same way: the bench's files dropped from the page cache (`_evict`). Prints a table and writes
`bench/results/resync.md`. Targets (DESIGN.md): <= 0.25x rsync's time, <= 1.3x the read time,
wire <= 1.2x the changed bytes. Run with `python -m bench.bench_resync [--size-mib N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_replication import _write_random
from bench.plane import MiB, replicate_then_resync, report, sync_once
from siterecovery.pki import CertificateAuthority

RESULTS = Path(__file__).resolve().parent / "results" / "resync.md"


def _evict(root: Path) -> int:
    """Start cold: every file of the bench written out and dropped from the page cache (fsync,
    then POSIX_FADV_DONTNEED, which needs no privilege; /proc/sys/vm/drop_caches as well where
    allowed). Returns the bytes of them still cached (`fincore`), for the results file."""
    subprocess.run(["sync"], check=True)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
        capture_output=True,
        text=True,
    ).stdout
    return sum(int(n) for n in out.split() if n.isdigit())


def _rewrite(path: Path, size: int, fraction: float, seed: int) -> int:
    rng = random.Random(seed)
    count = int(size * fraction) // 4096
    offsets = rng.sample(range(size // 4096), count)
    with open(path, "r+b") as f:
        for block in offsets:
            f.seek(block * 4096)
            f.write(os.urandom(4096))
    return count * 4096


def _read_once(path: Path, cold: Callable[[], None]) -> float:
    """Seconds `cat` takes to read `path`, started cold like the resyncs."""
    cold()
    t0 = time.monotonic()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - t0


def _read_parallel(path: Path, size: int, cold: Callable[[], None]) -> float:
    """Seconds 4 fio jobs take to read a quarter of `path` each in 1 MiB reads, started cold (fio's
    own run time: its start-up of 4 processes is left out). The resync reads the source that way
    (several 1 MiB streams at once), which on some disks is faster than `cat`'s one stream."""
    quarter = size // 4
    cold()
    out = subprocess.run(
        [
            "fio",
            "--name=read",
            f"--filename={path}",
            "--rw=read",
            "--bs=1M",
            "--ioengine=psync",
            "--numjobs=4",
            f"--size={quarter}",
            f"--offset_increment={quarter}",
            "--group_reporting",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out[out.index("{") :])["jobs"][0]["read"]["runtime"]) / 1000


def delta_resync(
    root: Path, ca: CertificateAuthority, src: Path, target: Path, size: int, cold: Callable[[], None]
) -> tuple[float, int]:
    """Seconds from assigning the delta resync to running services until the target equals the
    source (`cold` runs just before), and bytes the agent sent."""
    return sync_once(root, ca, src, target, size, "delta", services_running=True, before_start=cold)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=2048)
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/var/tmp")) as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.load_or_create(root / "ca")
        src, target, rtarget = root / "src.img", root / "target.img", root / "rsync-target.img"
        _write_random(src, size)
        shutil.copyfile(src, target)
        shutil.copyfile(src, rtarget)
        changed = _rewrite(src, size, 0.01, seed=1)
        cached: dict[str, int] = {}

        def cold(label: str) -> Callable[[], None]:
            def run() -> None:
                cached[label] = _evict(root)

            return run

        reads = [_read_once(src, cold("read 1"))]
        preads = [_read_parallel(src, size, cold("fio read 1"))]
        cold("rsync")()
        t0 = time.monotonic()
        out = subprocess.run(
            ["rsync", "-I", "--inplace", "--no-whole-file", "--stats", str(src), str(rtarget)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rsync_s = time.monotonic() - t0
        rtarget.unlink()
        sent_m = re.search(r"Total bytes sent: ([\d,.]+)", out)
        recv_m = re.search(r"Total bytes received: ([\d,.]+)", out)
        rsync_wire = sum(int(m.group(1).replace(",", "").replace(".", "")) for m in (sent_m, recv_m) if m)
        copied_s, copied_sent = delta_resync(root, ca, src, target, size, cold("copied"))
        target.unlink()
        # The product's case: the master target replicated the disk itself and kept its digests.
        kept = replicate_then_resync(
            root / "kept",
            ca,
            src,
            root / "kept-target.img",
            size,
            lambda: _rewrite(src, size, 0.01, seed=2),
            cold("kept"),
        )
        # Read again next to the resync (the shared disk's speed drifts); the ratio uses the mean.
        reads.append(_read_once(src, cold("read 2")))
        preads.append(_read_parallel(src, size, cold("fio read 2")))
    read_s = sum(reads) / len(reads)
    pread_s = sum(preads) / len(preads)
    digests = (size // MiB) * 16 + (size // MiB) * 256 * 16
    rows = [
        (
            "time, replica replicated by the master target (digests kept)",
            f"{kept.seconds:.2f} s",
            f"{rsync_s:.2f} s",
            f"{read_s:.2f} s",
            f"{kept.seconds / rsync_s:.2f}x rsync, {kept.seconds / read_s:.2f}x read",
            "<= 0.25x rsync, <= 1.3x read",
        ),
        (
            "time, digests kept, against 4 parallel 1 MiB readers (fio)",
            f"{kept.seconds:.2f} s",
            "-",
            f"{pread_s:.2f} s",
            f"{kept.seconds / pread_s:.2f}x parallel read",
            "-",
        ),
        (
            "bytes agent → target (digests kept)",
            f"{kept.sent / MiB:.1f} MiB",
            f"{rsync_wire / MiB:.1f} MiB (both ways)",
            "-",
            f"{kept.sent / changed:.2f}x changed ({changed / MiB:.1f} MiB); "
            f"rsync {rsync_wire / changed:.1f}x",
            "<= 1.2x",
        ),
        (
            "replica bytes the master target read (digests kept)",
            f"{kept.replica_read / MiB:.1f} MiB",
            "-",
            "-",
            "-",
            "0",
        ),
        (
            "time, replica copied outside (master target reads it)",
            f"{copied_s:.2f} s",
            f"{rsync_s:.2f} s",
            f"{read_s:.2f} s",
            f"{copied_s / rsync_s:.2f}x rsync, {copied_s / read_s:.2f}x read",
            "-",
        ),
        (
            "bytes agent → target (copied replica)",
            f"{copied_sent / MiB:.1f} MiB",
            "-",
            "-",
            f"{copied_sent / changed:.2f}x changed",
            "<= 1.2x",
        ),
        (
            "digests target → agent (upper bound)",
            f"{digests / MiB:.1f} MiB",
            "-",
            "-",
            f"{(kept.sent + digests) / changed:.2f}x changed incl. digests",
            "-",
        ),
    ]
    header = [
        "figure",
        "siterecovery delta resync",
        "rsync -I --inplace --no-whole-file",
        "read once",
        "ratio",
        "target",
    ]
    report(
        RESULTS,
        f"Delta resync, {args.size_mib} MiB, 1 % rewritten in scattered 4 KiB writes",
        header,
        rows,
        "Digests kept: the services run; the pair is first replicated in full by them (so the master"
        " target keeps the replica's block digests, `target_digests.py`), then 1 % of the source is"
        " rewritten behind the agent's back and the pair's generation raised with sync mode delta"
        " (the running sender picks the new sync up; no process or link is started); timed until"
        " the master target has durably applied the last block (pick-up of the assignment, re-read"
        " every 0.05 s, included). Only the source is read. Copied replica: the replica was copied"
        " outside the product, so the master target reads and hashes it as the source side is"
        " hashed. Cache: every timed run (read, rsync, both resyncs) starts cold the same way: each"
        " file of the bench is fsynced and dropped from the page cache with POSIX_FADV_DONTNEED"
        " (/proc/sys/vm/drop_caches as well where allowed); still cached at the starts, per"
        f" `fincore`: {', '.join(f'{k} {v / MiB:.1f} MiB' for k, v in cached.items())}. Read once:"
        f" `cat` of the source, measured before rsync and again after the resyncs"
        f" ({' and '.join(f'{r:.2f} s' for r in reads)}); the ratio uses their mean. The resync reads"
        " with 4 threads in 1 MiB preads, so a second row compares it with 4 fio jobs reading a"
        f" quarter each the same way ({' and '.join(f'{r:.2f} s' for r in preads)}). Without eviction"
        " both would read from memory (24 GB here) and the ratio would compare a warm read with"
        " whatever the page cache kept of the source after the full replication.",
        keep_history=True,
    )


if __name__ == "__main__":
    main()
