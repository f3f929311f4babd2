"""Run by .venv-kserve's Python (not pytest's): the KServe SDK, driven for tests/test_open_inference.py.

The SDK cannot share the test venv (kserve pins psutil<6 and brings its own fastapi, grpcio, protobuf; see
requirements-kserve.txt), so the tests call this script in a subprocess and read the JSON it prints.

    python tests/kserve_support.py client URL MODEL_NAME   what the SDK's REST client gets from a running service
    python tests/kserve_support.py validate MANIFEST       unknown fields of KServe resources, by the SDK's own types
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

IRIS_ROW = [1.0380048, 0.5586108, 1.1037828, 1.712096]
KSERVE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-kserve" / "bin" / "python"


def run_in_kserve_venv(*args: str, timeout_s: float = 120) -> Any:
    """From the tests: run this script with the KServe venv's Python; what it printed, as JSON."""
    if not KSERVE_PYTHON.exists():
        raise RuntimeError(f"{KSERVE_PYTHON} is missing: run `make kserve-venv` (make test does)")
    done = subprocess.run(
        [str(KSERVE_PYTHON), __file__, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"kserve_support.py {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


async def client(url: str, model_name: str) -> dict[str, Any]:
    import httpx
    import numpy as np
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    seen: dict[str, Any] = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0)) as rest:
        seen["live"] = await rest.is_server_live(url)
        seen["ready"] = await rest.is_server_ready(url)
        seen["model_ready"] = await rest.is_model_ready(url, model_name)
        seen["unknown_model_ready"] = await rest.is_model_ready(url, "no-such-model")

        as_json = InferInput("input_0", [1, 4], "FP64", data=IRIS_ROW)
        answer = await rest.infer(url, InferRequest(model_name, [as_json], request_id="kserve-json"), model_name)
        seen["json"] = _answer(answer)

        as_bytes = InferInput("input_0", [2, 4], "FP32")
        as_bytes.set_data_from_numpy(np.array([IRIS_ROW, IRIS_ROW], dtype=np.float32), binary_data=True)
        answer = await rest.infer(url, InferRequest(model_name, [as_bytes], request_id="kserve-binary"), model_name)
        seen["binary"] = _answer(answer)

        try:
            await rest.infer(url, InferRequest("no-such-model", [as_json]), "no-such-model")
        except httpx.HTTPStatusError as e:
            seen["unknown_model"] = {"status": e.response.status_code, "message": str(e)}
    return seen


def _answer(answer: Any) -> dict[str, Any]:
    (output,) = answer.outputs
    return {
        "id": answer.id,
        "model_name": answer.model_name,
        "name": output.name,
        "datatype": output.datatype,
        "shape": list(output.shape),
        "values": output.as_numpy().tolist(),
    }


def validate(path: str) -> list[str]:
    """Every field of every KServe resource in the file that the SDK's generated types do not know."""
    import yaml
    from kserve import models as kserve_models
    from kubernetes.client import models as kubernetes_models

    types = {
        "InferenceService": "V1beta1InferenceService",
        "ServingRuntime": "V1alpha1ServingRuntime",
        "ClusterServingRuntime": "V1alpha1ClusterServingRuntime",
    }

    def check(value: Any, type_name: str, where: str) -> list[str]:
        if match := re.fullmatch(r"list\[(.+)\]", type_name):
            if not isinstance(value, list):
                return [f"{where}: expected a list"]
            return [e for i, item in enumerate(value) for e in check(item, match[1], f"{where}[{i}]")]
        if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
            if not isinstance(value, dict):
                return [f"{where}: expected a mapping"]
            return [e for key, item in value.items() for e in check(item, match[1], f"{where}.{key}")]
        cls = getattr(kserve_models, type_name, None) or getattr(kubernetes_models, type_name, None)
        if cls is None:  # str, int, bool, object, datetime
            return []
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping ({type_name})"]
        fields = {json_name: cls.openapi_types[attr] for attr, json_name in cls.attribute_map.items()}
        errors = [f"{where}.{key}: unknown field of {type_name}" for key in value if key not in fields]
        return errors + [
            e for key, item in value.items() if key in fields for e in check(item, fields[key], f"{where}.{key}")
        ]

    errors: list[str] = []
    with open(path) as file:
        for document in yaml.safe_load_all(file):
            kind = document.get("kind")
            if kind not in types:
                errors.append(f"{kind}: not a KServe resource this check knows")
                continue
            errors += check(document, types[kind], kind)
    return errors


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = asyncio.run(client(*args)) if command == "client" else validate(*args)
    print(json.dumps(result))
