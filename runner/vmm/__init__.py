"""The VMMs kiln drives: one driver per VMM behind ``runner.vmm.driver.Driver``."""
