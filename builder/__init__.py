"""kiln's build stage: OCI image reference → reproducible, verified ext4 base volume."""
