"""A lab machine's disk export: each disk served over NBD on its own Unix socket until SIGTERM.

This is what a lab machine's agent does for its guest until the real agent takes the role
(`runtime.agent_command` is the one place that chooses the command). Each disk is an export named
by its label; the guest and any NBD client (qemu-io, nbdcopy) use the disk only through it.

    python -m siterecovery.lab.export --unix-dir DIR --disk LABEL=PATH [--disk LABEL=PATH ...]

Disk LABEL is served as export LABEL on DIR/LABEL.sock, the layout the real agent uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from siterecovery.dataplane.nbd.image import Export
from siterecovery.dataplane.nbd.server import NbdServer


def _parse_disk(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--disk {text!r} must be LABEL=PATH")
    return label, Path(path)


async def serve(unix_dir: Path, disks: list[tuple[str, Path]]) -> None:
    unix_dir.mkdir(parents=True, exist_ok=True)
    servers = [
        NbdServer([Export.for_image(label, path)], unix=unix_dir / f"{label}.sock") for label, path in disks
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for server in servers:
        await server.start()
    print(f"serving {', '.join(label for label, _ in disks)} in {unix_dir}", flush=True)
    try:
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m siterecovery.lab.export", description=__doc__)
    parser.add_argument("--unix-dir", type=Path, required=True, help="folder of the per-disk Unix sockets")
    parser.add_argument("--disk", type=_parse_disk, action="append", required=True, help="LABEL=PATH")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.unix_dir, args.disk))


if __name__ == "__main__":
    main()
