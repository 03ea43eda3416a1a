"""`hounsfield token`: print a bearer token signed with the data folder's key (the embedded issuer).

    hounsfield token --sub alice --role radiologist --ttl 8h
    curl -H "Authorization: Bearer $(hounsfield token --sub alice --role admin)" http://127.0.0.1:8080/dicom-web/studies

The key is made in `<data>/keys/signing.pem` if the server has not made it yet. `iss` and `aud` come from
`HOUNSFIELD_AUTH_ISSUER` / `HOUNSFIELD_AUTH_AUDIENCE`, as the server expects them. Only the token goes to
standard output, so that `$(hounsfield token ...)` works; nothing is logged.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from server.clisettings import settings_from_args

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """`3600`, `90s`, `15m`, `8h`, `7d` → seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 3600, 15m, 8h or 7d, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def cmd_token(args: argparse.Namespace) -> int:
    from authz.tokens import issue_token

    settings = settings_from_args(args)
    token = issue_token(
        settings,
        sub=args.sub,
        roles=args.role,
        scopes=args.scope,
        patient=args.patient,
        purpose_of_use=args.purpose,
        ttl_seconds=args.ttl,
        client_id=args.client_id,
    )
    print(token)
    sys.stdout.flush()
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "token",
        help="print a bearer token signed with this data folder's key",
        description="Issue a JWT (ES256) that this server accepts. Send it as `Authorization: Bearer <token>`.",
    )
    parser.add_argument("--sub", required=True, help="the subject (user or service name)")
    parser.add_argument("--role", action="append", default=[], help="a role, e.g. radiologist (repeatable)")
    parser.add_argument(
        "--scope", action="append", default=[], help="a SMART v2 scope, e.g. user/ImagingStudy.rs (repeatable)"
    )
    parser.add_argument(
        "--patient",
        help="SMART patient context: the token reaches only this patient's data (imaging, reports, the Patient, "
        "AI runs and results), whatever its roles, unless a user/ or system/ --scope covers the action; roles still "
        "limit (a referring token sees the patient only if it is in its care list)",
    )
    parser.add_argument(
        "--purpose", action="append", default=[], help="purpose of use (HL7 v3 ActReason), e.g. TREAT or BTG"
    )
    parser.add_argument("--client-id", dest="client_id", help="the client_id claim")
    parser.add_argument("--ttl", type=parse_ttl, default=3600, help="lifetime: 3600, 15m, 8h, 7d (default 1h)")
    parser.add_argument("--data", type=Path, help="data folder (default ./var, or HOUNSFIELD_DATA)")
    parser.set_defaults(func=cmd_token)
