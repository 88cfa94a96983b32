"""Errors that mean bad input: the CLI prints their one-line message and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names the problem and the fix."""
