"""kiln's run stage (snapshots booted as microVMs) and the ``kiln`` command line."""
