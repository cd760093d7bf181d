"""Did-you-mean hints for misspelt names: settings, command-line options, organs."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of `choices`, or "" when none is close."""
    match = difflib.get_close_matches(name, list(choices), 1)
    return f" (did you mean {match[0]!r}?)" if match else ""
