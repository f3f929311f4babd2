"""The README's custom-workflow example, run as the README shows it: in-process with ``workflows.run_batch``, and
named in CLASSIC_INF_WORKFLOW_CLASS behind a real ``bentoml serve`` from a module on PYTHONPATH."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tests.fixtures.server import serving
from workflows import Outcome, run_batch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_code() -> str:
    section = README.read_text().split("### Your own workflow", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 17  # the class itself at most 15 lines, plus its two imports
    return code


def readme_workflow():
    namespace: dict = {}
    exec(compile(readme_code(), "README.md", "exec"), namespace)
    workflow = namespace["Scaler"]()
    workflow.setup()
    return workflow


def test_readme_workflow_batches_and_isolates_failures():
    workflow = readme_workflow()
    forwards: list[tuple[int, ...]] = []
    run_model = workflow.run_model
    workflow.run_model = lambda batch: forwards.append(tuple(batch.shape)) or run_model(batch)  # counts forwards
    rows = [[1.0, 2.0, 3.0, 4.0]], [[0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 0.0]]
    outcomes = run_batch(workflow, [{"rows": rows[0]}, {"nope": 1}, {"rows": rows[1]}])
    assert [o.status for o in outcomes] == [200, 400, 200]
    assert outcomes[1] == Outcome(400, None, "rows: missing")
    assert forwards == [(3, 4)]  # both good requests in one forward, by TensorWorkflow's default batching
    with torch.no_grad():
        alone = [workflow.model(torch.tensor(r, dtype=torch.float64)).tolist() for r in rows]
    assert [outcomes[0].body, outcomes[2].body] == alone


def test_readme_workflow_behind_bentoml_serve(tmp_path):
    package = tmp_path / "user_code"
    package.mkdir()
    (package / "readme_scaler.py").write_text(readme_code())
    python_path = os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")]))
    env = {"CLASSIC_INF_WORKFLOW_CLASS": "readme_scaler.Scaler", "PYTHONPATH": python_path}
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 0.0], [-1.0, 3.0, 0.0, 2.0]]
    with serving(env, tmp_path) as server:

        def ask(data):
            return server.post({"source": 1, "data": data})

        # the server's model has its own random weights: a request's rows must get what each row gets alone
        with ThreadPoolExecutor(8) as pool:
            each = list(pool.map(ask, [{"rows": [row]} for row in rows]))
            together = ask({"rows": rows})
        assert [r.status_code for r in each] == [200] * 4 and together.status_code == 200
        for row_answer, answer in zip([r.json()[0] for r in each], together.json()):
            assert torch.allclose(torch.tensor(row_answer), torch.tensor(answer), rtol=1e-9, atol=1e-12)

        bad = ask({"nope": 1})
        assert bad.status_code == 400
        assert bad.json() == {"code": "400", "name": "Bad Request", "description": "rows: missing"}
        wrong_width = ask({"rows": [[1.0, 2.0, 3.0]]})  # the Linear(4, 2) raises: run_model's failure
        assert wrong_width.status_code == 422
        assert wrong_width.json()["code"] == "422"
        assert server.get("/info").json()["workflow"] == "readme_scaler.Scaler"
