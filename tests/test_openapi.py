"""/docs.json describes POST /service_output (served by the raw ASGI app) with the contract's schemas, and its
examples work against a real server. The page itself (/, /static_content/) is BentoML's, handed back by the raw app."""

from __future__ import annotations

import re

import pytest
import requests

from core.terms import DTYPE_NAMES, InfernetInput

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec(iris_server) -> dict:
    response = iris_server.get("/docs.json")
    assert response.status_code == 200
    return response.json()


def resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref", "")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def test_service_output_takes_an_infernet_input(spec):
    operation = spec["paths"]["/service_output"]["post"]
    body = operation["requestBody"]["content"]["application/json"]
    schema = resolve(spec, body["schema"])
    assert schema["title"] == "InfernetInput"
    assert set(schema["properties"]) == set(InfernetInput.model_fields)
    assert sorted(schema["required"]) == ["data", "source"]
    assert resolve(spec, schema["properties"]["source"])["enum"] == [0, 1]
    assert resolve(spec, schema["properties"]["destination"])["enum"] == [0, 1, 2]
    tensor = resolve(spec, schema["properties"]["data"]["oneOf"][1])
    assert tensor["properties"]["dtype"]["enum"] == list(DTYPE_NAMES)
    assert tensor["required"] == ["dtype", "values"]


def test_responses_are_a_tensor_or_the_chain_answer_and_errors_are_json(spec):
    responses = spec["paths"]["/service_output"]["post"]["responses"]
    ok = responses["200"]["content"]["application/json"]
    assert [resolve(spec, s)["required"] for s in ok["schema"]["oneOf"]] == [
        ["dtype", "shape", "values"],
        ["raw_input", "processed_input", "raw_output", "processed_output", "proof"],
    ]
    for status in ("400", "413", "422", "500", "503"):
        content = responses[status]["content"]["application/json"]
        assert resolve(spec, content["schema"])["required"] == ["code", "name", "description"]
        assert content["example"]["code"] == status


def test_the_documented_examples_work(iris_server, spec):
    operation = spec["paths"]["/service_output"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    documented = operation["responses"]["200"]["content"]["application/json"]["example"]

    answer = iris_server.post(examples["iris"]["value"])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["dtype"], body["shape"]) == (documented["dtype"], documented["shape"])
    argmax = [max(range(3), key=row.__getitem__) for row in (body["values"][0], documented["values"][0])]
    assert argmax == [2, 2]

    chain = iris_server.post(examples["iris-chain"]["value"])
    assert chain.status_code == 200, chain.text
    assert set(chain.json()) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}
    assert len(chain.json()["raw_output"]) == 64 * (2 + 3)  # offset, length, three int256 probabilities


def test_an_error_answer_fits_the_error_schema(iris_server, spec):
    error = spec["components"]["schemas"]["Error"]
    answer = iris_server.post({"source": 1, "data": {"dtype": "double", "values": [[1.0, 2.0], [3.0]]}})
    assert answer.status_code == 400
    assert set(error["required"]) <= set(answer.json()) <= set(error["properties"])


def test_the_page_and_its_assets_are_served(iris_server):
    page = iris_server.get("/")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert page.headers["content-type"].startswith("text/html")
    # Everything the page loads comes from this server: BentoML's page called Google Tag Manager on every visit.
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(source.startswith("./static_content/") for source in sources), sources
    assert "googletagmanager" not in page.text
    for source in sources:
        assert iris_server.get(source.removeprefix(".")).status_code == 200, source
    missing = iris_server.get("/static_content/no-such-file.js")
    assert missing.status_code == 404 and missing.json()["code"] == "404"
    wrong_method = requests.post(f"{iris_server.url}/docs.json", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "405"
