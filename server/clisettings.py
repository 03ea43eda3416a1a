"""The settings of a `hounsfield` command: the environment, with the command line's options (`--data`, `--host`,
`--port`) over it. Every command module (`server.cli`, `server.cli_*`, `inference.cli`) builds its settings here,
below the `server.cli` entry point that imports those modules."""

from __future__ import annotations

import argparse
import os

from server.settings import Settings


def env_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The command line's options as the environment variables they stand for."""
    env = {}
    if getattr(args, "data", None):
        env["HOUNSFIELD_DATA"] = str(args.data)
    if getattr(args, "host", None):
        env["HOUNSFIELD_HOST"] = args.host
    if getattr(args, "port", None) is not None:
        env["HOUNSFIELD_PORT"] = str(args.port)
    return env


def settings_from_args(args: argparse.Namespace) -> Settings:
    """`Settings.from_env` of the environment with `env_overrides(args)` applied (raises `SettingsError`)."""
    return Settings.from_env({**os.environ, **env_overrides(args)})
