"""kiln's privileged boundary, and the lowest layer every other package may import.

Only this package holds code that may run as root (later: ``kiln-helper``). It depends on
the standard library and pydantic alone, so it can be installed into a root-owned venv.
The error hierarchy lives here because it is the one thing every layer shares.
"""
