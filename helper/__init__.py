"""kiln's privileged boundary: ``kiln-helper`` and every op it runs as root for a caller.

Only this package holds code that may run as root. It depends on the standard library and
pydantic alone, so ``scripts/install-helper`` can copy it into a root-owned venv. Its
sub-package ``helper.base`` (errors, the stdlib tool runner, file primitives, safe paths)
is the lowest layer: the rest of the helper, ``builder`` and ``runner`` import it, and it
imports nothing else of kiln (``lint-imports`` checks both).
"""
