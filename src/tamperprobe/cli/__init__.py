"""The ``tamperprobe`` command line: options wired to library calls."""

from .app import app, main

__all__ = ["app", "main"]
