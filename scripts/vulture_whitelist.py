"""Names vulture (``.venv/bin/vulture``, configured in pyproject.toml) must not call dead.

vulture scans ``builder``, ``helper`` and ``runner`` without the tests, so a public name
that only its own test calls shows up as dead, and is removed. What is listed here is
reached some other way; every entry says how. Decorated click commands and pydantic
validators, and pydantic's ``model_config``, are ignored by pattern in pyproject.toml.
Never imported or run: ``_`` stands for "an attribute of some object".
"""

# -- protocols: called by Python or a library, by name ------------------------------------
et, ev, tb  # __exit__(exc_type, exc_value, traceback) of context managers
exc  # __exit__(*exc)
_.gname  # tarfile.TarInfo: written into the tar header by tarfile (builder/demoimage.py)
_.row_factory  # sqlite3.Connection: how rows come back (runner/vm/state.py)

# -- observation points: the test suite watches live code through them --------------------
_.manifest_digest  # blobcache.Pulled: what a pull fetched (tests/builder/test_source_registry)
_.config_digest  # ditto
_.superblock  # builder.ext4: mkfs's reproducible uuid, seed, features (tests/builder/test_ext4)
_.access_log  # builder.localregistry: which blobs a build fetched (tests/builder/test_refresh)
_.volume_path  # builder.pool: a base volume's file (tests/builder/test_pool_reflink)
_.get_snapshot  # builder.pool: one snapshot's record (tests/dmthin_guest/run_dmthin)
_.needs_check  # dmthin_core.PoolUsage: the parsed status line, kept whole (tests/helper)
_.used_meta_blocks  # ditto
_.total_meta_blocks  # ditto

# -- test hooks: the suite drives them ----------------------------------------------------
_.FAULT_STEPS  # builder.pool.base: the fault-injection points (tests/e2e/test_pool_cli)
_.can_mknod  # builder.probes: the `root` marker's probe (tests/conftest.py)
_.STATES  # runner.vm.state: the record's state vocabulary (tests/runner draw states from it)
_.definition  # runner.vmm.fcsnapshot.ApiRequest: the API definition a body must validate
#               against (tests/runner/test_firecracker validates every body with the 1.12.1 schema)
_.pause  # runner.vmm.fcapi.FirecrackerVM: warm start (#14) calls it; tested against the real
#          binary (tests/runner/test_firecracker_snapshot)
_.resume  # ditto
_.snapshot_create  # ditto (the name is also the pool's op, so vulture does not flag it yet)
_.restore  # ditto
_.kernel_sha256  # builder.warm.WarmKey: hashed whole by key_id (asdict), never read by name
_.initrd_sha256  # ditto
_.vmm_version  # ditto
_.cpu_model  # ditto
_.init_sha256  # ditto
_.cmdline  # ditto
