"""Firecracker jails: staging the chroot, the jailer's cgroups, launching the jailer."""
