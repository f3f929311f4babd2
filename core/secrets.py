"""The service's secrets (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, BEARER_TOKEN / BEARER_TOKEN_FILE): checked once at
start-up for what an HTTP header can carry, and scrubbed from any text that leaves the process (``scrub``).

Why both: a token an HTTP library refuses makes that library raise an error whose text quotes the header, token
and all; the check stops such a token at start-up, and ``scrub`` keeps any other library message that quotes a
token out of answers and logs. Imports nothing of the service's, so that core/errors.py can use it.
"""

from __future__ import annotations

import os

# Variables whose values are secrets (BEARER_TOKEN_FILE's content is remembered when read: core/settings.py).
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "BEARER_TOKEN")
MASK = "***"
_remembered: set[str] = set()


def check(name: str, value: str) -> str:
    """``value`` (already stripped of surrounding whitespace) when every character is printable ASCII other than a
    space, which is what an ``Authorization: Bearer`` header carries in every HTTP library; else ValueError with a
    one-line reason naming ``name`` and the fault, never the value. Remembers the value for ``scrub``."""
    remember(value)
    for c in value:
        if c in "\r\n":
            raise ValueError(f"{name}: contains a line break; a token is one line of printable ASCII")
        if c.isspace():
            raise ValueError(f"{name}: contains whitespace; a token is printable ASCII without spaces")
        if not "!" <= c <= "~":
            kind = "a control character" if ord(c) < 32 or ord(c) == 127 else "a non-ASCII character"
            raise ValueError(f"{name}: contains {kind} (U+{ord(c):04X}); a token is printable ASCII without spaces")
    return value


def remember(value: str) -> None:
    """Have ``scrub`` hide ``value`` (and each of its lines) from now on in this process."""
    for part in (value, *value.split()):
        if len(part) >= 4:  # shorter pieces would mask ordinary words
            _remembered.add(part)


def scrub(text: str) -> str:
    """``text`` with every secret of this process replaced by ``***``: those remembered, and the secret variables'
    values as they are in the environment now. Raises nothing."""
    secrets = set(_remembered)
    for name in SECRET_VARIABLES:
        raw = os.environ.get(name, "")
        secrets.update(part for part in (raw, raw.strip(), raw.strip().strip("'\""), *raw.split()) if len(part) >= 4)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: a line of a token is inside the token
        text = text.replace(secret, MASK)
    return text
