"""Lab machines whose guest is a real Linux VM: QEMU booting a kernel and a small initramfs whose
data disk is the machine's agent NBD export.

`image` builds the guest image from the installed Debian packages (and probes once whether KVM
can boot it), `cpio` writes the initramfs, `guest` is the process that runs QEMU in place of the
Python guest, and `fs_oracle` checks an ext4 disk image from the host, as the guest does at boot.
"""
