"""The page a person tries the service with: Swagger UI at / (BentoML's), fed by our /docs.json.

Chromium opens it from a real `bentoml serve`, sends the documented iris example with "Try it out" -> Execute,
and reads the answer the page shows.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_the_page_sends_the_iris_example_and_shows_class_2(iris_server, browser_page):
    page = browser_page
    page.set_default_timeout(30_000)
    page.goto(f"{iris_server.url}/")
    operation = page.locator("#operations-Service_APIs-service_output")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()

    sent = json.loads(operation.locator("textarea.body-param__text").input_value())
    assert sent["source"] == 1 and sent["data"]["dtype"] == "double" and len(sent["data"]["values"][0]) == 4

    operation.get_by_role("button", name="Execute").click()
    live = operation.locator(".live-responses-table .response")
    shown = live.locator(".response-col_description pre.microlight").first
    shown.wait_for()
    assert live.locator(".response-col_status").first.inner_text().strip() == "200"
    answer = json.loads(shown.inner_text())
    assert answer["dtype"] == "float" and answer["shape"] == [1, 3]
    probabilities = answer["values"][0]
    assert max(range(3), key=probabilities.__getitem__) == 2
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_the_page_shows_the_schemas(iris_server, browser_page):
    page = browser_page
    page.set_default_timeout(30_000)
    page.goto(f"{iris_server.url}/")
    page.locator("#operations-Service_APIs-service_output").wait_for()
    models = page.locator("section.models")
    for name in ("InfernetInput", "TensorInput", "TensorOutput", "ChainOutput", "Error"):
        assert models.locator(f"#model-{name}").count() == 1, name
