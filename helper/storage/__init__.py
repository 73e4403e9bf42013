"""The privileged storage primitives: loop-backed pools, volumes and snapshots by fd, dm-thin."""
