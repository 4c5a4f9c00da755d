"""JSON Schemas of what baerase writes, shipped with the package.

``report.schema.json`` (draft 2020-12) describes ``report.json`` at ``baerase.report.SCHEMA_VERSION``:
``$defs/scan`` is ``ScanReport.to_dict()`` and ``$defs/erase`` is ``EraseResult.to_dict()``.
"""

from __future__ import annotations

import json
from importlib.resources import files

__all__ = ["report_schema"]


def report_schema() -> dict:
    """The JSON Schema of report.json, as a dict (e.g. for ``jsonschema.validate``)."""
    return json.loads(files(__name__).joinpath("report.schema.json").read_text(encoding="utf-8"))
