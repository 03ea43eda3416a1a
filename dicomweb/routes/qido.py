"""Placeholder: filled in by the qido work."""

from __future__ import annotations

from typing import Any

ROUTES: list[Any] = []
