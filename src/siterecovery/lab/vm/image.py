"""The VM guest's image: a Debian kernel and an initramfs built from the installed packages, cached.

The initramfs holds busybox-static (the shell and its applets), e2fsprogs' `mke2fs`, `e2fsck`
and `dumpe2fs` with the shared libraries they load, the virtio modules the kernel does not build
in (loaded in dependency order from `modules.dep`), and `init.sh` as `/init`. It is built on first
use into a cache folder named by a digest of its inputs, so a kernel update or a changed init
script gives a new image and an unchanged one is reused (`siterecovery lab image`).

Acceleration: KVM when it can boot this kernel, else TCG. Some hosts offer a `/dev/kvm` that
boots only specially built kernels (PVM): a stock kernel hangs there. So KVM is tried once, by
booting the image with a short timeout, and the answer is cached next to the image.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from siterecovery.fabrics.base import FabricError
from siterecovery.fabrics.lab_model import Accel
from siterecovery.lab.vm.cpio import CpioWriter

QEMU = "qemu-system-x86_64"
_BUILD_VERSION = "1"  # bump when the image layout changes
_MODULES = ("virtio_pci", "virtio_blk", "ext4")
_E2FSPROGS = ("e2fsck", "mke2fs", "dumpe2fs")
PROBE_TIMEOUT = 20.0  # a kernel that works under KVM reaches /init in well under a second
PACKAGES = "qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs"


@dataclass(frozen=True)
class GuestImage:
    folder: Path
    kernel_version: str
    kernel_bytes: int
    initrd_bytes: int
    built_at: float

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"


@dataclass(frozen=True)
class AccelProbe:
    kvm: bool
    reason: str
    seconds: float
    checked_at: float


def cache_root() -> Path:
    explicit = os.environ.get("SITERECOVERY_VM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "siterecovery" / "vm-guest"


def _missing(what: str) -> FabricError:
    return FabricError(
        "vm-guest-unavailable",
        f"A VM guest cannot be built here: {what}.",
        f"Install the Debian packages {PACKAGES} (`make system-deps` does), or use the Python guest.",
    )


def _kernel() -> tuple[str, Path]:
    """The newest installed kernel that has its modules (cloud flavour preferred: smaller, boots faster)."""
    found = []
    for path in Path("/boot").glob("vmlinuz-*"):
        version = path.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").is_file() and os.access(path, os.R_OK):
            found.append((("cloud" in version), [int(x) for x in re.findall(r"\d+", version)], version, path))
    if not found:
        raise _missing("no readable kernel in /boot with its modules in /lib/modules")
    _, _, version, path = max(found)
    return version, path


def _tool(name: str) -> Path:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/sbin") / name, Path("/usr/sbin") / name) if p.exists()), None
    )
    if path is None:
        raise _missing(f"{name} is not installed")
    return Path(path)


def _busybox() -> Path:
    path = _tool("busybox")
    if "not a dynamic executable" not in _ldd_output(path):
        # A dynamically linked busybox would need its libraries at boot; busybox-static has none.
        raise _missing(f"{path} is not the static busybox (package busybox-static)")
    return path


def _ldd_output(path: Path) -> str:
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


def _libraries(path: Path) -> list[Path]:
    return [Path(p) for p in re.findall(r"(/\S+) \(0x", _ldd_output(path))]


def _module_files(version: str) -> list[str]:
    """The .ko files (relative to /) to load for `_MODULES`, dependencies first, built-ins skipped."""
    base = Path("/lib/modules") / version
    builtin = {Path(line).stem for line in (base / "modules.builtin").read_text().split()}
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[Path(module).name.split(".ko")[0].replace("-", "_")] = [module, *rest.split()]
    order: list[str] = []

    def add(relative: str) -> None:
        name = Path(relative).name.split(".ko")[0].replace("-", "_")
        for dep in reversed(deps[name][1:]):
            add(dep)
        if relative not in order:
            order.append(relative)

    for module in _MODULES:
        if module in builtin:
            continue
        if module not in deps:
            raise _missing(f"kernel {version} has neither a built-in nor a module {module}")
        add(deps[module][0])
    for relative in order:
        if relative.endswith((".xz", ".zst", ".gz")):
            raise _missing(f"module {relative} is compressed; busybox insmod loads only plain .ko files")
    return [str((base / r).relative_to("/")) for r in order]


def _inputs() -> tuple[str, Path, list[Path], list[str], bytes]:
    version, kernel = _kernel()
    binaries = [_busybox(), *(_tool(b) for b in _E2FSPROGS)]
    modules = _module_files(version)
    init = resources.files("siterecovery.lab.vm").joinpath("init.sh").read_bytes()
    return version, kernel, binaries, modules, init


def _digest(kernel: Path, binaries: list[Path], modules: list[str], init: bytes) -> str:
    h = hashlib.sha256(_BUILD_VERSION.encode() + init)
    for path in [kernel, *binaries, *(Path("/") / m for m in modules)]:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _initramfs(binaries: list[Path], modules: list[str], init: bytes) -> bytes:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    for folder in ("bin", "dev", "proc", "sys", "mnt", "tmp", "etc"):
        cpio.directory(folder)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    busybox, *e2fs = binaries
    cpio.file("bin/busybox", busybox.read_bytes())
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    for tool in e2fs:
        cpio.file(f"bin/{tool.name}", tool.read_bytes())
        for lib in _libraries(tool):
            real = lib.resolve()
            cpio.file(str(real).lstrip("/"), real.read_bytes())
            if real != lib:
                cpio.directory(str(lib.parent).lstrip("/"))
                cpio.symlink(str(lib).lstrip("/"), str(real))
    for applet in applets.split():
        if applet not in {t.name for t in e2fs}:
            cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin", "bin")
    for module in modules:
        cpio.file(module, (Path("/") / module).read_bytes(), 0o644)
    cpio.file("etc/modules", "".join(f"{m}\n" for m in modules).encode(), 0o644)
    cpio.file("init", init)
    cpio.close()
    return out.getvalue()


def _load(folder: Path) -> GuestImage | None:
    try:
        meta = json.loads((folder / "image.json").read_text())
        return GuestImage(folder=folder, **meta)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def ensure_image() -> GuestImage:
    """The cached guest image for the installed packages, built now if there is none."""
    if shutil.which(QEMU) is None:
        raise _missing(f"{QEMU} is not installed")
    version, kernel, binaries, modules, init = _inputs()
    root = cache_root()
    folder = root / _digest(kernel, binaries, modules, init)
    image = _load(folder)
    if image is not None:
        return image
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two machines powering on at once build it once
        image = _load(folder)
        if image is not None:
            return image
        work = root / f".build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        shutil.copyfile(kernel, work / "vmlinuz")
        (work / "initrd.img").write_bytes(_initramfs(binaries, modules, init))
        image = GuestImage(
            folder=folder,
            kernel_version=version,
            kernel_bytes=(work / "vmlinuz").stat().st_size,
            initrd_bytes=(work / "initrd.img").stat().st_size,
            built_at=time.time(),
        )
        meta = {k: v for k, v in asdict(image).items() if k != "folder"}
        (work / "image.json").write_text(json.dumps(meta, indent=2))
        os.replace(work, folder)
    return image


def qemu_command(
    kernel: Path, initrd: Path, accel: Accel, append: str, drive: list[str], memory_mib: int = 128
) -> list[str]:
    """QEMU for one guest: serial console on stdio, no reboot (a poweroff or panic ends QEMU)."""
    return [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", f"q35,accel={accel.value}", "-cpu", "host" if accel is Accel.KVM else "max",
        "-m", f"{memory_mib}M", "-smp", "1",
        "-kernel", str(kernel), "-initrd", str(initrd),
        # cryptomgr.notests: the kernel's crypto self-tests cost about a second of a TCG boot.
        "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 cryptomgr.notests {append}",
        "-serial", "stdio", "-no-reboot",
        *drive,
    ]  # fmt: skip


RECONNECT_DELAY = 60  # s: covers an agent's restart (`lab power on`) on a loaded host


def nbd_drive(socket: Path, export: str) -> list[str]:
    """The machine's agent export as the guest's virtio disk.

    A real agent is a filter in the disk's path: when its process dies the disk stays. Here the
    agent serves the disk, so QEMU reconnects to its socket and holds the guest's requests for up
    to RECONNECT_DELAY seconds (resent once the agent is back) instead of failing them."""
    return [
        "-blockdev",
        f"driver=nbd,node-name=d0,server.type=unix,server.path={socket},export={export},"
        f"reconnect-delay={RECONNECT_DELAY}",
        "-device", "virtio-blk-pci,drive=d0",
    ]  # fmt: skip


def file_drive(path: Path) -> list[str]:
    """A plain raw image file as the guest's virtio disk (the bench's baseline)."""
    return [
        "-blockdev", f"driver=file,node-name=f0,filename={path},cache.direct=off",
        "-blockdev", "driver=raw,node-name=d0,file=f0",
        "-device", "virtio-blk-pci,drive=d0",
    ]  # fmt: skip


def boot_once(image: GuestImage, accel: Accel, timeout: float) -> tuple[bool, float, str]:
    """Boot the image in probe mode; (reached /init, seconds, last console text)."""
    cmd = qemu_command(image.kernel, image.initrd, accel, "sr.mode=probe", [])
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return False, time.monotonic() - started, out.decode(errors="replace")[-300:]
    text = out.decode(errors="replace")
    return "SR READY" in text, time.monotonic() - started, text[-300:]


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(image: GuestImage, refresh: bool = False) -> AccelProbe:
    """Whether KVM boots this image's kernel: tried once per kernel (a new init script does not
    change the answer), the answer cached in the cache folder."""
    cached = image.folder.parent / f"accel-{image.kernel_version}.json"
    if not refresh:
        try:
            return AccelProbe(**json.loads(cached.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            pass
    if not kvm_usable():
        result = AccelProbe(False, "no usable /dev/kvm", 0.0, time.time())
    else:
        ok, seconds, tail = boot_once(image, Accel.KVM, PROBE_TIMEOUT)
        reason = "the guest booted under KVM" if ok else f"the guest did not boot under KVM: {tail!r}"
        result = AccelProbe(ok, reason[:400], round(seconds, 2), time.time())
    tmp = cached.with_name(f".accel.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, cached)
    return result


def resolve_accel(image: GuestImage, wanted: Accel) -> Accel:
    if wanted is not Accel.AUTO:
        return wanted
    return Accel.KVM if probe_kvm(image).kvm else Accel.TCG
