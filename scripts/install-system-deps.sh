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
  [fio]=fio
  [rsync]=rsync
  [go]=golang-go
  [chromium]=chromium
  # VM lab guests (siterecovery.lab.vm): QEMU, and busybox + e2fsprogs for the guest's initramfs.
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [e2fsck]=e2fsprogs
  [debugfs]=e2fsprogs
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

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t unique < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing system packages: ${unique[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${unique[@]}" >/dev/null
