"""The README's custom-workflow example, run as the README shows it: in-process with ``workflows.run_batch``."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from workflows import Outcome, run_batch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_workflow():
    section = README.read_text().split("### Your own workflow", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 17  # the class itself at most 15 lines, plus its two imports
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    workflow = namespace["Scaler"]()
    workflow.setup()
    return workflow


def test_readme_workflow_batches_and_isolates_failures():
    workflow = readme_workflow()
    rows = [[1.0, 2.0, 3.0, 4.0]], [[0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 0.0]]
    outcomes = run_batch(workflow, [{"rows": rows[0]}, {"nope": 1}, {"rows": rows[1]}])
    assert [o.status for o in outcomes] == [200, 400, 200]
    assert outcomes[1] == Outcome(400, None, "rows: 'rows'")
    with torch.no_grad():
        alone = [workflow.model(torch.tensor(r, dtype=torch.float64)).tolist() for r in rows]
    assert [outcomes[0].body, outcomes[2].body] == alone
