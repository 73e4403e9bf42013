"""``python -m runner`` runs the kiln CLI (the tests use it to run the exact venv code)."""

from runner.cli import main

main()
