"""The OpenAPI document (/docs.json, shown by Swagger UI at /) for the routes the raw ASGI app serves.

BentoML documents only its typed ``@bentoml.api`` routes (and mounted FastAPI apps); ``POST /service_output`` is served
by ``public.app.PublicApp`` for speed, so it would be missing. ``DocumentedService`` (the base of the public
service's ``service_class`` on the fast path, ``FastRouteService``) extends BentoML's own document with these routes.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import bentoml

from core import bentoml_seam
from core.asgi import ContractErrors, merge_slashes
from core.terms import DTYPE_NAMES, InfernetInput, error_body
from public import SERVICE_NAME, __version__, auth, routes
from public.app import PublicApp

REF = "#/components/schemas/{model}"

# The embedded iris model (models/iris) on one flower: class 2 (virginica) of three.
IRIS_REQUEST = {"source": 1, "data": {"dtype": "double", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}}
IRIS_RESPONSE = {"dtype": "float", "shape": [1, 3], "values": [[2.4885e-17, 5.116e-14, 1.0]]}
# The same flower as a contract would send it: ABI int256[] in 18-decimal fixed point, answered on-chain.
IRIS_CHAIN_REQUEST = {
    "source": 0,
    "destination": 0,
    "data": "0000000000000000000000000000000000000000000000000000000000000020"
    "0000000000000000000000000000000000000000000000000000000000000004"
    "0000000000000000000000000000000000000000000000000e67bbddb3268000"
    "00000000000000000000000000000000000000000000000007c095901db25fc0"
    "0000000000000000000000000000000000000000000000000f516c9bc72fa000"
    "00000000000000000000000000000000000000000000000017c2963dad5e0000",
}

_TENSOR_VALUES = {
    "type": "array",
    "items": {},
    "description": "Nested lists, rectangular; complex numbers as [real, imag] pairs on the innermost axis.",
}
_SCHEMAS: dict[str, Any] = {
    "TensorInput": {
        "type": "object",
        "description": "OFFCHAIN data of the torch workflow. Other keys are ignored.",
        "required": ["dtype", "values"],
        "properties": {
            "dtype": {"type": "string", "enum": list(DTYPE_NAMES)},
            "values": _TENSOR_VALUES,
            "shape": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "description": "Optional; with it, values may be flat and are reshaped.",
            },
        },
        "example": IRIS_REQUEST["data"],
    },
    "TensorOutput": {
        "type": "object",
        "description": "The model's output tensor, in the input's vocabulary: a valid `data` for the next container. "
        "Non-finite values are null.",
        "required": ["dtype", "shape", "values"],
        "properties": {
            "dtype": {"type": "string", "enum": list(DTYPE_NAMES)},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "values": _TENSOR_VALUES,
        },
        "example": IRIS_RESPONSE,
    },
    "ChainOutput": {
        "type": "object",
        "description": "destination 0 (CHAIN): raw_output is the flattened output as ABI int256[], 18 decimals, "
        "hex without 0x.",
        "required": ["raw_input", "processed_input", "raw_output", "processed_output", "proof"],
        "properties": {
            name: {"type": "string"} for name in ("raw_input", "processed_input", "raw_output", "processed_output")
        }
        | {"proof": {"type": "string"}},
    },
    "Error": {
        "type": "object",
        "description": "Every error: the HTTP status in the status line and in `code` (a string).",
        "required": ["code", "name", "description"],
        "properties": {
            "code": {"type": "string", "example": "400"},
            "name": {"type": "string", "example": "Bad Request"},
            "description": {"type": "string", "example": "values: row 2 has 3 elements, expected 4"},
            "errors": {
                "type": "array",
                "description": "Validation errors, when the body did not fit InfernetInput.",
                "items": {
                    "type": "object",
                    "properties": {"loc": {"type": "array", "items": {}}, "msg": {"type": "string"}},
                },
            },
        },
    },
}

_ERRORS = {  # status: (when, an example description)
    400: (
        "The body is not an InfernetInput, or its data is not a valid tensor",
        "values: row 2 has 3 elements, expected 4",
    ),
    413: ("The body is larger than MAX_REQUEST_BYTES", "body exceeds the limit of 33554432 bytes (MAX_REQUEST_BYTES)"),
    422: ("The model raised on this input (wrong feature count, wrong rank)", "the model failed on this input: ..."),
    500: ("A fault of the service itself", "the model runner failed (500)"),
    503: ("Not ready yet, or overloaded; retry", "the model runner is overloaded; retry later"),
}


def _json(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema, **extra}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def input_schemas() -> dict[str, Any]:
    """InfernetInput as pydantic describes it, its enums hoisted to components, `data` pointing at TensorInput."""
    schema = InfernetInput.model_json_schema(ref_template=REF)
    schemas = schema.pop("$defs", {})
    schema["properties"]["data"] = {
        "description": "CHAIN (source 0): hex of an ABI-encoded int256[] in 18-decimal fixed point; "
        "OFFCHAIN (source 1): a JSON object, for the torch workflow a TensorInput.",
        "oneOf": [{"type": "string", "pattern": "^(0x)?[a-fA-F0-9]+$"}, _ref("TensorInput")],
    }
    return {**schemas, "InfernetInput": schema}


def paths() -> dict[str, Any]:
    errors = {
        str(status): {"description": when, **_json(_ref("Error"), example=error_body(status, example))}
        for status, (when, example) in _ERRORS.items()
    }
    service_output = {
        "post": {
            "tags": ["Service APIs"],
            "operationId": "service_output",
            "summary": "Run the model on one input",
            "description": "The route an Infernet node calls. OFFCHAIN answers are TensorOutput; destination 0 "
            "answers ChainOutput. The body is read as JSON whatever its Content-Type.",
            "requestBody": {
                "required": True,
                **_json(
                    _ref("InfernetInput"),
                    examples={
                        "iris": {"summary": "The embedded iris model, OFFCHAIN", "value": IRIS_REQUEST},
                        "iris-chain": {"summary": "The same flower, CHAIN in and out", "value": IRIS_CHAIN_REQUEST},
                    },
                ),
            },
            "responses": {
                "200": {
                    "description": "The model's output",
                    **_json({"oneOf": [_ref("TensorOutput"), _ref("ChainOutput")]}, example=IRIS_RESPONSE),
                },
                **errors,
            },
        }
    }
    get_json = {"description": "OK", **_json({"type": "object"})}
    return {
        "/service_output": service_output,
        "/info": {
            "get": {
                "tags": ["Service APIs"],
                "operationId": "info",
                "summary": "Version, workflow, model (source, file, sha256, format, dtype) and limits",
                "responses": {"200": get_json, "503": errors["503"]},
            }
        },
        "/service-resources": {
            "get": {
                "tags": ["Service APIs"],
                "operationId": "service_resources",
                "summary": "What an Infernet node's GET /resources collects from this container",
                "parameters": [
                    {
                        "name": "model_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "With it, the answer is {supported: bool}.",
                    }
                ],
                "responses": {"200": get_json, "503": errors["503"]},
            }
        },
    }


def require_bearer(components: dict[str, Any], items: dict[str, Any]) -> None:
    """Declare the bearer scheme and the 401 on the routes public/auth.py protects, so that Swagger UI shows its
    Authorize button and sends the token with Try it out."""
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "BEARER_TOKEN (the Infernet node's bearer)"}
    }
    refused = {
        "description": "No Authorization: Bearer token, or not the right one",
        **_json(
            _ref("Error"), example=error_body(401, "this route needs an Authorization: Bearer token (BEARER_TOKEN)")
        ),
    }
    for path, item in items.items():
        if auth.protects(path):
            for operation in item.values():
                operation["security"] = [{"bearer": []}]
                operation["responses"]["401"] = refused


def extend(spec: Any, bearer: bool = False) -> Any:
    """BentoML's OpenAPISpecification with this service's own routes and schemas added; with ``bearer`` (a token
    is configured), the routes that need it say so. Runs in an API worker for each GET /docs.json, and in
    `bentoml build` (the bento's apis/openapi.yaml); raises nothing."""
    components = copy.deepcopy(spec.components) if isinstance(spec.components, dict) else {"schemas": {}}
    components.setdefault("schemas", {}).update({**_SCHEMAS, **input_schemas()})
    items = paths()
    if bearer:
        require_bearer(components, items)
    info = attrs.evolve(
        spec.info,
        title=SERVICE_NAME,
        version=__version__,
        description="PyTorch models for Infernet nodes. Try POST /service_output with the iris example: "
        "Try it out, then Execute.",
    )
    ours = {path: bentoml_seam.path_item(item) for path, item in items.items()}
    return attrs.evolve(spec, info=info, paths={**spec.paths, **ours}, components=components)


class DocumentedService(bentoml.Service):
    """A BentoML service whose OpenAPI document also describes the routes of its mounted raw ASGI app."""

    @property
    def openapi_spec(self) -> Any:
        public = next((mounted for mounted, *_ in self.mount_apps if isinstance(mounted, PublicApp)), None)
        return extend(super().openapi_spec, bearer=public is not None and public.needs_token)

    def to_asgi(self, is_main: bool = True) -> Any:
        # Outermost, so that BentoML's routes, the fast routes and ours all see ``//service_output`` merged, and
        # every answer any of them gives reaches the client as JSON in the contract's shape.
        app = merge_slashes(self.app_stack(is_main))
        public = next((mounted for mounted, *_ in self.mount_apps if isinstance(mounted, PublicApp)), None)
        if public is None:
            return app
        return ContractErrors(app, public, routes.error_for, routes.is_own_error)

    def app_stack(self, is_main: bool) -> Any:
        """The ASGI app before repeated slashes are merged: BentoML's."""
        return super().to_asgi(is_main)


class FastRouteService(DocumentedService):
    """The public service's class on the fast path (``service_class`` of ``@bentoml.service``): its ASGI app is
    ``FastRoute`` (core/bentoml_seam.py) in front of BentoML's, handing ``POST /service_output`` straight to
    ``PublicApp.serve``, and its OpenAPI document covers the raw routes (``DocumentedService``)."""

    def app_stack(self, is_main: bool) -> Any:
        app = super().app_stack(is_main)  # also applies this service's configuration to BentoML's container
        public = next((mounted for mounted, *_ in self.mount_apps if isinstance(mounted, PublicApp)), None)
        # CORS and middleware added to the service must see every request: then BentoML's stack serves them all.
        # HealthRoutes (service.py) answers the health routes in that stack; it needs no request but those.
        added = [cls for cls, _ in self.middlewares if cls is not routes.HealthRoutes]
        if public is None or added or bentoml_seam.cors_enabled():
            return app
        logged = bentoml_seam.access_log_enabled()
        # /readyz and /livez too: BentoML answers a service still loading, or stuck, with plain text naming its
        # internals, and its /livez knows nothing of a hung model.
        readiness = bentoml_seam.FastRoute(app, "/readyz", public.serve, access_log_enabled=logged)
        liveness = bentoml_seam.FastRoute(readiness, "/livez", public.serve, access_log_enabled=logged)
        return bentoml_seam.FastRoute(liveness, "/service_output", public.serve, access_log_enabled=logged)
