"""What both sides of kiln's privilege boundary share: errors, the stdlib tool runner,
file primitives and safe paths. It imports nothing else of kiln."""
