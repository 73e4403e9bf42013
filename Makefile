# Convenience targets; the README's two commands are scripts/demo and scripts/test.
.PHONY: test demo lint bench deps
deps:
	./scripts/install-deps.sh
test:
	./scripts/test
demo:
	./scripts/demo
lint: deps
	.venv/bin/ruff check .
	.venv/bin/mypy
bench: deps
	.venv/bin/python bench/build.py
