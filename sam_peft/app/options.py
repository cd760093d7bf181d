"""Limits of the web app that its command line shows, kept free of heavy imports so that building the command
line stays fast."""
from __future__ import annotations

MAX_UPLOAD_MB = 512
