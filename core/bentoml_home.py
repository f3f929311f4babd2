"""``python -m core.bentoml_home``: ``BENTOML_HOME`` checked before ``bentoml serve`` starts (``make serve`` runs it
first), one line and exit status 2 when it cannot be created.

Why before, and not in service.py: ``bentoml serve`` creates ``BENTOML_HOME`` and its ``bentos``, ``models``,
``envs`` and ``tmp`` folders while it resolves the model store its ``import_service`` takes
(``bentoml/_internal/configuration/containers.py`` ``bentoml_home``), before it imports service.py, so a home it
cannot create (below a regular file, on a read-only volume) ends in BentoML's traceback and no code of the
service's runs. ``bentoml serve`` run by hand, or an image whose ``BENTOML_HOME`` is overridden, still gets that
traceback (README, "Configuration").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from core.errors import unwritable

# What BentoML 1.4 creates in BENTOML_HOME at start-up (validate_or_create_dir of the home and these folders).
FOLDERS = ("bentos", "models", "envs", "tmp")
FIX = "set BENTOML_HOME to a writable directory"


def problem(env: Mapping[str, str]) -> str | None:
    """None when ``BENTOML_HOME`` (default ``~/bentoml``, BentoML's) and its folders exist or could be created
    (creating them, as BentoML would); else one line naming the variable, the path, the reason and the fix."""
    home = Path(env.get("BENTOML_HOME", "~/bentoml")).expanduser()  # read as BentoML reads it
    try:
        for path in (home, *(home / folder for folder in FOLDERS)):
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"BENTOML_HOME {home} is not writable: {unwritable(e)}; {FIX}"
    return None


if __name__ == "__main__":
    if message := problem(os.environ):
        print(f"start-up failed (environment): {message}", file=sys.stderr, flush=True)
        sys.exit(2)
