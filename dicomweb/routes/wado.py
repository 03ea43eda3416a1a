"""Placeholder: filled in by the wado work."""

from __future__ import annotations

from typing import Any

ROUTES: list[Any] = []
