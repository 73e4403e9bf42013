"""A VM's lifecycle: its record, its spec, its host resources, the reaper."""
