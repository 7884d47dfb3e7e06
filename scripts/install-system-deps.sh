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
)
missing=()
for tool in "${!need[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
done
# vcsim is built offline from Debian's govmomi sources.
[ -d /usr/share/gocode/src/github.com/vmware/govmomi ] || missing+=(golang-github-vmware-govmomi-dev)
# A PostgreSQL server for the tests that run the configuration server on PostgreSQL.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
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
# 3.35.0 is the newest Azurite that runs on the Node.js of Debian 12 and of this project's CI.
if ! command -v azurite-blob >/dev/null 2>&1; then
  echo "installing azurite@3.35.0 from npm"
  $sudo npm install -g --no-fund --no-audit azurite@3.35.0 >/dev/null
fi
