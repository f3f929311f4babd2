"""The embedded example model (models/iris): `make model` retrains it to the same bytes in any checkout."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IRIS = REPO / "models" / "iris"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_retraining_in_another_checkout_gives_the_committed_model_and_card(tmp_path):
    # Explorer F10: the TorchScript archive held the script's absolute path (and its constants' order followed the
    # string hash seed), so `make model` anywhere but the folder it was first run in changed the file's sha256.
    checkout = tmp_path / "another" / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "train_iris.py", checkout / "scripts")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    # Another CPU's kernels: on an AVX-512 machine the committed file (trained elsewhere) came out different (CI); the
    # script now pins the ISA-neutral kernels itself, whatever the machine or these variables say.
    env.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")
    env["PYTHONPATH"] = str(REPO)  # the repository's packages, which the copied script imports
    done = subprocess.run(
        [sys.executable, str(checkout / "scripts" / "train_iris.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    made = checkout / "models" / "iris"
    assert sha256(made / "model.torch") == sha256(IRIS / "model.torch")
    assert (made / "MODEL_CARD.md").read_text() == (IRIS / "MODEL_CARD.md").read_text()
