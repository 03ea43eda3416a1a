"""Placeholder: routes filled in by the work in progress."""

from __future__ import annotations

from typing import Any

ROUTES: list[Any] = []
