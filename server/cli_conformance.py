"""`hounsfield conformance`: check the DICOM Conformance Statement against this server's routes and the ingest's
failure reasons (`conformance.check`)."""

from __future__ import annotations

import argparse
from typing import Any

from conformance.check import problems, report
from server.app import create_app
from server.settings import Settings


def cmd_conformance(_args: argparse.Namespace) -> int:
    return report(problems(create_app(Settings.from_env({}))))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "conformance", help="check the DICOM Conformance Statement against the server's routes and failure reasons"
    )
    parser.set_defaults(func=cmd_conformance)
