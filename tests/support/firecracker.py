"""Firecracker's API definition (tests/data) as data, and request bodies validated against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

# Firecracker's API definition trimmed to what kiln uses and brought back to 1.12.1, the release
# kiln runs (its header says what changed and how it was checked against the real binary).
SPEC = Path(__file__).resolve().parents[1] / "data" / "firecracker-api-1.12.1.yaml"


def load_swagger() -> dict[str, Any]:
    """The swagger file as data (PyYAML, a test dependency)."""
    import yaml

    return dict(yaml.safe_load(SPEC.read_text()))


def validate(swagger: dict[str, Any], definition: str, body: Any) -> None:
    """Validate ``body`` against ``#/definitions/<definition>`` with $refs resolved."""
    schema = {"$ref": f"#/definitions/{definition}", "definitions": swagger["definitions"]}
    jsonschema.Draft4Validator(schema).validate(body)
