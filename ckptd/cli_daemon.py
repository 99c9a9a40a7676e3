"""Daemon-side CLI commands (run, once, check, status, demo). Filled in by the daemon modules."""

from __future__ import annotations

import argparse


def add_daemon_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register daemon subcommands; each sets ``func``."""
    return None
