"""Placeholder: filled in by the wadouri work."""

from __future__ import annotations

from typing import Any

ROUTES: list[Any] = []
