#!/usr/bin/env bash
# Installs the system tools the test suite runs against, only those that are missing.
# Debian 12 package names; needs root (or sudo) and the Debian registry.
set -euo pipefail

declare -A need=(
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  # An NBD server that can refuse structured replies (--no-sr): the client's old-server fallback.
  [nbdkit]=nbdkit
  [fio]=fio
  [rsync]=rsync
  [go]=golang-go
  [chromium]=chromium
  # VM lab guests (siterecovery.lab.vm): QEMU, and busybox + e2fsprogs for the guest's initramfs.
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [e2fsck]=e2fsprogs
  [debugfs]=e2fsprogs
  # The libvirt fabric's tests run their own libvirtd (QEMU driver, TCG) and use virsh.
  [libvirtd]=libvirt-daemon-driver-qemu
  [virtlogd]=libvirt-daemon
  [virsh]=libvirt-clients
  # libvirt 9 puts an isolated network's bridge behind iptables rules (a test failover's network).
  [iptables]=iptables
  [pkg-config]=pkg-config
  [gcc]=gcc
  [ip]=iproute2
)
missing=()
for tool in "${!need[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
done
# vcsim is built offline from Debian's govmomi sources.
[ -d /usr/share/gocode/src/github.com/vmware/govmomi ] || missing+=(golang-github-vmware-govmomi-dev)
# A PostgreSQL server for the tests that run the configuration server on PostgreSQL.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# The VM guests' kernel (the cloud flavour: small, virtio as modules, ext4 built in).
compgen -G "/boot/vmlinuz-*" >/dev/null || missing+=(linux-image-cloud-amd64)
# busybox-static, not the dynamically linked busybox that may already be installed.
{ command -v busybox >/dev/null && ! ldd "$(command -v busybox)" >/dev/null 2>&1; } || missing+=(busybox-static)
# libvirt-python (pip) builds against libvirt's headers.
[ -f /usr/include/libvirt/libvirt.h ] || missing+=(libvirt-dev)
# Azurite (the Azure storage emulator) comes from npm; Debian's npm brings Node.js.
command -v azurite-blob >/dev/null 2>&1 || command -v npm >/dev/null 2>&1 || missing+=(npm)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t unique < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing system packages: ${unique[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${unique[@]}" >/dev/null
fi
# libvirtd's QEMU driver runs domains as libvirt-qemu (Debian's build); libvirt-daemon-system would
# create it with a systemd unit this project does not use.
getent group libvirt-qemu >/dev/null || $sudo groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  $sudo useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
# In the kvm group, as Debian's package puts it: without /dev/kvm access libvirtd finds its cached
# QEMU capabilities stale on every call and probes QEMU again (seconds per capabilities request).
if getent group kvm >/dev/null && ! id -nG libvirt-qemu | grep -qw kvm; then
  $sudo usermod -aG kvm libvirt-qemu
fi
# 3.35.0 is the newest Azurite that runs on the Node.js of Debian 12 and of this project's CI.
if ! command -v azurite-blob >/dev/null 2>&1; then
  echo "installing azurite@3.35.0 from npm"
  $sudo npm install -g --no-fund --no-audit azurite@3.35.0 >/dev/null
fi
