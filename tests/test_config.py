"""Configuration from the environment: defaults, JSON parsing, and one-line errors naming the variable."""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from core import settings as config
from core.errors import StartupError
from core.settings import BUILTIN_TORCH_WORKFLOW, EMBEDDED_MODEL, ServiceSettings, TorchSettings
from tests.fixtures.server import SERVICE_VARS
from workflows.sources import spec_from_kwargs


def test_nothing_set_serves_the_embedded_model():
    settings = ServiceSettings.from_env({})
    assert settings.workflow_class == BUILTIN_TORCH_WORKFLOW
    assert settings.workflow_kwargs == {"model_path": str(EMBEDDED_MODEL)}
    assert EMBEDDED_MODEL.is_file()


@pytest.mark.parametrize(
    "class_path",
    [BUILTIN_TORCH_WORKFLOW, "infernet_ml.workflows.inference.torch_inference_workflow.TorchInferenceWorkflow"],
)
def test_naming_only_the_default_class_still_serves_the_embedded_model(class_path):
    # Explorer F4: setting CLASSIC_INF_WORKFLOW_CLASS to its documented default stopped start-up ("name a model").
    settings = ServiceSettings.from_env({"CLASSIC_INF_WORKFLOW_CLASS": class_path})
    assert settings.workflow_class == BUILTIN_TORCH_WORKFLOW
    assert settings.workflow_kwargs == {"model_path": str(EMBEDDED_MODEL)}
    # Named KW_ARGS, even {}, and other classes keep what they were given.
    assert not ServiceSettings.from_env(
        {"CLASSIC_INF_WORKFLOW_CLASS": class_path, "CLASSIC_INF_WORKFLOW_KW_ARGS": "{}"}
    ).workflow_kwargs
    assert not ServiceSettings.from_env({"CLASSIC_INF_WORKFLOW_CLASS": "my_workflows.Scaler"}).workflow_kwargs


def test_original_library_class_path_resolves_to_builtin():
    env = {
        "CLASSIC_INF_WORKFLOW_CLASS": "infernet_ml.workflows.inference.torch_inference_workflow.TorchInferenceWorkflow",
        "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": "[]",
        "CLASSIC_INF_WORKFLOW_KW_ARGS": '{"model_name": "Org/repo"}',
    }
    settings = ServiceSettings.from_env(env)
    assert settings.workflow_class == BUILTIN_TORCH_WORKFLOW
    assert settings.workflow_kwargs == {"model_name": "Org/repo"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CLASSIC_INF_WORKFLOW_KW_ARGS": "{model_name: x}"}, "CLASSIC_INF_WORKFLOW_KW_ARGS: expected a JSON object"),
        ({"CLASSIC_INF_WORKFLOW_KW_ARGS": "[1]"}, "CLASSIC_INF_WORKFLOW_KW_ARGS: expected a JSON object, got an array"),
        ({"CLASSIC_INF_WORKFLOW_KW_ARGS": "null"}, "CLASSIC_INF_WORKFLOW_KW_ARGS: expected a JSON object, got null"),
        ({"CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": "{}"}, "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS: expected a JSON list"),
        ({"MAX_BATCH_SIZE": "lots"}, "MAX_BATCH_SIZE: expected an integer >= 2"),
        ({"MAX_BATCH_SIZE": "1"}, "got 1; to run every request alone, set batching to false in CLASSIC_INF"),
        ({"API_WORKERS": "100000"}, "API_WORKERS: expected an integer from 1 to 256, got 100000"),
        ({"MAX_REQUEST_BYTES": "-5"}, "MAX_REQUEST_BYTES: expected an integer"),
        ({"REQUEST_TIMEOUT_S": "soon"}, "REQUEST_TIMEOUT_S: expected a number"),
        ({"SHUTDOWN_TIMEOUT_S": "soon"}, "SHUTDOWN_TIMEOUT_S: expected a number"),
        ({"SHUTDOWN_TIMEOUT_S": "0"}, "SHUTDOWN_TIMEOUT_S: expected a number >= 0.1"),
    ],
)
def test_service_settings_errors_name_the_variable(env, message):
    with pytest.raises(StartupError) as refused:
        ServiceSettings.from_env(env)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_torch_settings():
    settings = TorchSettings.from_env(
        {
            "TORCH_MODEL_FILE_NAME": "net.pt2",
            "USE_JIT": "True",
            "USE_ARWEAVE": "true",
            "ALLOWED_ARWEAVE_OWNERS": '["addr1", "addr2"]',
            "ARWEAVE_GATEWAY": "http://127.0.0.1:1984/",
            "MODEL_CACHE_DIR": "/tmp/cache",
            "HUGGING_FACE_HUB_TOKEN": "hf_secret",
        }
    )
    assert settings.model_file_name == "net.pt2" and settings.use_jit and settings.use_arweave
    assert settings.allowed_arweave_owners == ("addr1", "addr2")
    assert settings.arweave_gateway == "http://127.0.0.1:1984"
    assert str(settings.model_cache_dir) == "/tmp/cache"
    assert settings.hf_token == "hf_secret" and "hf_secret" not in repr(settings)
    assert TorchSettings.from_env({"HF_TOKEN": "a", "HUGGING_FACE_HUB_TOKEN": "b"}).hf_token == "a"
    assert TorchSettings.from_env({"ALLOWED_ARWEAVE_OWNERS": "a, b,"}).allowed_arweave_owners == ("a", "b")


@pytest.mark.parametrize(
    "cpus, cpu_max, threads",
    [(1, None, 1), (2, None, 1), (8, None, 7), (8, "max 100000", 7), (8, "150000 100000", 1), (8, "400000 100000", 3)],
)
def test_model_threads_leave_a_core_to_the_http_side(tmp_path, monkeypatch, cpus, cpu_max, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(config, "CGROUP_CPU_MAX", tmp_path / "cpu.max")  # a container's CPU limit, when given
    if cpu_max:
        config.CGROUP_CPU_MAX.write_text(cpu_max + "\n")
    assert TorchSettings.from_env({}).num_threads == threads
    assert TorchSettings.from_env({"TORCH_NUM_THREADS": "3"}).num_threads == 3


@pytest.mark.parametrize(
    "env, message",
    [
        ({"USE_ARWEAVE": "true"}, "ALLOWED_ARWEAVE_OWNERS: required when USE_ARWEAVE is true"),
        ({"USE_ARWEAVE": "maybe"}, "USE_ARWEAVE: expected true or false"),
        ({"TORCH_NUM_THREADS": "9" * 23}, "TORCH_NUM_THREADS: expected an integer from 1 to 1024, got 999"),
        ({"ALLOWED_ARWEAVE_OWNERS": "[1, 2]"}, "ALLOWED_ARWEAVE_OWNERS: expected a JSON list of wallet addresses"),
    ],
)
def test_torch_settings_errors(env, message):
    with pytest.raises(StartupError, match=message.replace("(", r"\(")):
        TorchSettings.from_env(env)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"model_path": 5}, "model_path: expected a string, got 5"),
        ({"model_path": ["a"]}, "model_path: expected a string, got an array"),
        ({"model_source": "local", "model_args": {"model_path": 5}}, "model_args.model_path: expected a string"),
        ({"model_source": "huggingface_hub", "model_args": {"repo_id": 5}}, "model_args.repo_id: expected a string"),
        ({"model_name": "org/x", "revision": {"a": 1}}, "revision: expected a string, got an object"),
    ],
)
def test_a_model_key_of_the_wrong_json_type_is_named(kwargs, key):
    # Explorer F-g: {"model_path": 5} was a TypeError traceback (exit 1), not the one line naming the variable.
    with pytest.raises(StartupError, match="^CLASSIC_INF_WORKFLOW_KW_ARGS: " + re.escape(key)):
        spec_from_kwargs(kwargs, TorchSettings())


def test_the_three_model_forms():
    hf = TorchSettings.from_env({"TORCH_MODEL_FILE_NAME": "m.torch"})
    by_name = spec_from_kwargs({"model_name": "Org/repo", "revision": "v1"}, hf)
    assert (by_name.source, by_name.repo_id, by_name.filename, by_name.revision) == (
        "huggingface",
        "Org/repo",
        "m.torch",
        "v1",
    )

    arweave = TorchSettings.from_env({"USE_ARWEAVE": "1", "ALLOWED_ARWEAVE_OWNERS": "me"})
    on_arweave = spec_from_kwargs({"model_name": "Org/repo"}, arweave)
    assert (on_arweave.source, on_arweave.owners) == ("arweave", ("me",))

    original = spec_from_kwargs(
        {"model_source": "HUGGINGFACE_HUB", "model_args": {"repo_id": "Org/x", "filename": "f.pt"}}, hf
    )
    assert (original.source, original.repo_id, original.filename) == ("huggingface", "Org/x", "f.pt")
    versioned = spec_from_kwargs(
        {"model_source": "arweave", "model_args": {"repo_id": "r", "filename": "f", "owners": ["o"], "version": "2"}},
        hf,
    )
    assert (versioned.source, versioned.owners, versioned.revision) == ("arweave", ("o",), "2")

    local = spec_from_kwargs({"model_path": "/models/m.pt2", "sha256": "A" * 64}, hf)
    assert (local.source, str(local.path), local.filename, local.sha256) == (
        "local",
        "/models/m.pt2",
        "m.pt2",
        "a" * 64,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "name a model with model_name, model_source + model_args, or model_path"),
        ({"model_source": "ftp", "model_args": {}}, "unknown model_source 'ftp'"),
        ({"model_source": "huggingface_hub", "model_args": {}}, "model_args.repo_id is required"),
        ({"model_path": "/m", "sha256": "abc"}, "sha256 must be 64 hex digits"),
    ],
)
def test_model_form_errors(kwargs, message):
    with pytest.raises(StartupError) as refused:
        spec_from_kwargs(kwargs, TorchSettings())
    assert message in str(refused.value)


class RecordingEnv(Mapping):
    """An empty environment that remembers every name it was asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        raise KeyError(name)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


# Read, but not the service's settings: the OS's cache location (test servers set MODEL_CACHE_DIR, which wins over
# it) and BentoML's own metrics directory.
NOT_SETTINGS = {"XDG_CACHE_HOME", "PROMETHEUS_MULTIPROC_DIR"}
SOURCES = ["core", "public", "runner", "workflows"]


def test_every_variable_the_service_reads_is_listed_for_test_servers_to_clear():
    env = RecordingEnv()
    ServiceSettings.from_env(env)
    TorchSettings.from_env(env)
    # Reads of the process's environment outside the settings (the Hugging Face library's own variables).
    # ``env_value(os.environ, "NAME")`` and the typed readers given ``os.environ`` count too.
    pattern = re.compile(r"""(?:environ\.get\(|environ\[|getenv\(|os\.environ,)\s*["']([A-Z][A-Z0-9_]*)["']""")
    code = [config.REPO_ROOT / "service.py", *(p for d in SOURCES for p in (config.REPO_ROOT / d).rglob("*.py"))]
    read_directly = {name for path in code for name in pattern.findall(path.read_text())}
    assert {"MAX_BATCH_SIZE", "BEARER_TOKEN_FILE", "HF_ENDPOINT"} <= env.asked | read_directly  # the check works
    missing = (env.asked | read_directly) - NOT_SETTINGS - set(config.VARIABLES)
    assert not missing, f"read by the service but not in core.settings.VARIABLES: {sorted(missing)}"
    assert set(SERVICE_VARS) == set(config.VARIABLES)


@pytest.mark.parametrize(
    "value, use_jit",
    [("t", True), ("T", True), ("1", True), ("True", True), ("yes", False), ("on", False), ("f", False), ("", False)],
)
def test_use_jit_reads_as_the_original_service_read_it(value, use_jit):
    # Explorer F13: the original read os.getenv("USE_JIT", "False").lower() in ("true", "1", "t"), so an env file
    # with USE_JIT=t turned JIT on and USE_JIT=yes left it off; here t was refused and yes turned it on.
    assert TorchSettings.from_env({"USE_JIT": value}).use_jit is use_jit


@pytest.mark.parametrize("value, on", [("t", True), ("f", False), ("yes", True), ("0", False)])
def test_the_service_booleans_take_t_and_f(value, on):
    assert TorchSettings.from_env({"USE_ARWEAVE": value, "ALLOWED_ARWEAVE_OWNERS": "a"}).use_arweave is on
    assert ServiceSettings.from_env({"INFERNET_FAST_PATH": value}).fast_path is on


# Finding C0: the newer Infernet torch services' names (core/legacy_env.py), read as this service's own or refused.
AR_OWNER = "a" * 43


@pytest.mark.parametrize(
    "env, kwargs",
    [
        (
            {"MODEL_SOURCE": "2", "LOAD_ARGS": "'{\"repo_id\": \"Org/net\", \"filename\": \"m.torch\"}'"},
            {"model_source": "huggingface", "model_args": {"repo_id": "Org/net", "filename": "m.torch"}},
        ),
        (
            {"MODEL_SOURCE": "1", "LOAD_ARGS": json.dumps({"repo_id": f"{AR_OWNER}/net", "filename": "m.torch",
                                                           "version": "v2"})},
            {"model_source": "arweave",
             "model_args": {"repo_id": "net", "owners": [AR_OWNER], "filename": "m.torch", "version": "v2"}},
        ),
        ({"MODEL_SOURCE": "0", "LOAD_ARGS": '{"model_path": "/m/net.pt"}'}, {"model_path": "/m/net.pt"}),
        (
            {"TORCH_DEFAULT_MODEL_ID": "huggingface/Org/net/rev1:m.pt"},
            {"model_source": "huggingface",
             "model_args": {"repo_id": "Org/net", "filename": "m.pt", "version": "rev1"}},
        ),
        (
            {"TORCH_DEFAULT_MODEL_ID": '"local/me/net/v1:m.pt"', "TORCH_CACHE_DIR": "/c"},
            {"model_path": "/c/local/me/net/v1/m.pt"},
        ),
        (
            {"TORCH_DEFAULT_MODEL_ID": "huggingface/Org/net:m.pt", "CLASSIC_INF_WORKFLOW_KW_ARGS": '{"device": "cpu"}'},
            {"device": "cpu", "model_source": "huggingface", "model_args": {"repo_id": "Org/net", "filename": "m.pt"}},
        ),
    ],
    ids=["1.x-hf", "1.x-arweave", "1.x-local", "2.0-hf", "2.0-local", "2.0-with-kwargs"],
)  # fmt: skip
def test_legacy_model_variables_name_the_model(env, kwargs):
    settings = ServiceSettings.from_env(env)
    assert settings.workflow_kwargs == kwargs
    assert settings.legacy_mapped and all(note.read_as for note in settings.legacy_mapped)


def test_legacy_torch_variables():
    settings = TorchSettings.from_env({"TORCH_USE_JIT": "1", "TORCH_CACHE_DIR": "/c"})
    assert settings.use_jit and settings.model_cache_dir == Path("/c")
    assert not TorchSettings.from_env({"TORCH_USE_JIT": "off", "USE_JIT": "false"}).use_jit
    v1 = {"MODEL_SOURCE": "2", "LOAD_ARGS": '{"repo_id": "a/b", "filename": "f", "cache_path": "/d"}'}
    assert TorchSettings.from_env(v1).model_cache_dir == Path("/d")  # fmt: skip


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MODEL_ARGS": "{}"}, "MODEL_ARGS was never read"),
        ({"ONNX_MODEL_LRU_CACHE_SIZE": "3"}, "set those and remove ONNX_MODEL_LRU_CACHE_SIZE"),
        ({"LOGLEVEL": "DEBUG"}, "LOGLEVEL=DEBUG: not read here"),
        ({"MODEL_SOURCE": "2"}, "MODEL_SOURCE without LOAD_ARGS"),
        ({"MODEL_SOURCE": "7", "LOAD_ARGS": "{}"}, "MODEL_SOURCE: expected 0 (LOCAL), 1 (ARWEAVE) or 2"),
        ({"MODEL_SOURCE": "2", "LOAD_ARGS": '{"repo_id": "a/b", "filename": "f", "version": "v"}'},
         "ignored version for Hugging Face"),
        ({"MODEL_SOURCE": "2", "LOAD_ARGS": '{"repo_id": "a/b", "file": "f"}'}, "LOAD_ARGS: unknown keys ['file']"),
        ({"TORCH_USE_JIT": "maybe"}, "TORCH_USE_JIT: expected true or false"),
        ({"TORCH_CACHE_DIR": "/a", "MODEL_CACHE_DIR": "/b"}, "TORCH_CACHE_DIR and MODEL_CACHE_DIR"),
        ({"TORCH_DEFAULT_MODEL_ID": "huggingface/a/b:x,y"}, "TORCH_DEFAULT_MODEL_ID: model id"),
        ({"TORCH_DEFAULT_MODEL_ID": "huggingface/a/b:m", "MODEL_SOURCE": "0", "LOAD_ARGS": '{"model_path": "/m"}'},
         "TORCH_DEFAULT_MODEL_ID and MODEL_SOURCE and LOAD_ARGS name different models"),
        ({"TORCH_DEFAULT_MODEL_ID": "huggingface/a/b:m", "CLASSIC_INF_WORKFLOW_CLASS": "my.Workflow"},
         "CLASSIC_INF_WORKFLOW_CLASS is my.Workflow"),
    ],
)  # fmt: skip
def test_legacy_variables_refused(env, message):
    with pytest.raises(StartupError) as refused:
        ServiceSettings.from_env(env)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_make_serve_stops_with_one_line_for_a_bentoml_home_that_cannot_be_created(tmp_path):
    # bentoml serve creates BENTOML_HOME before it imports service.py, so it ended in BentoML's traceback
    # (NotADirectoryError) and no code of ours ran; make serve checks it first (core/bentoml_home.py). A path below a
    # regular file: even root cannot create it, as on a read-only volume.
    import subprocess

    from tests.fixtures.server import REPO, free_port, server_env

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = server_env({"BENTOML_HOME": str(blocker / "home"), "PORT": str(free_port()), "HOST": "127.0.0.1"}, tmp_path)
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.runtime", "serve"],  # -o: never (re)install the venv here
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("start-up failed")]
    assert line == (
        f"start-up failed (environment): BENTOML_HOME {blocker / 'home'} is not writable: {blocker / 'home'} "
        "(Not a directory); set BENTOML_HOME to a writable directory"
    )
    from core.bentoml_home import problem

    assert problem({"BENTOML_HOME": str(tmp_path / "fine")}) is None and (tmp_path / "fine" / "models").is_dir()
