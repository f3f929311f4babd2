# Two commands on a fresh machine: `make serve` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
HOST ?= 0.0.0.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test lint bench soak model clean browser arlocal kserve-venv image image-tools peers-venv wrk

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The KServe SDK for tests/test_open_inference.py, in a venv of its own: its pins (psutil<6, fastapi, grpcio,
# protobuf) must not touch the service's environment (requirements-kserve.txt).
KSERVE_VENV := .venv-kserve
$(KSERVE_VENV)/.installed: requirements-kserve.txt
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q -r requirements-kserve.txt
	touch $@

kserve-venv: $(KSERVE_VENV)/.installed

# LitServe, a peer in the load benchmark, in a venv of its own (requirements-peers.txt): it brings fastapi and
# websockets, and websockets would change the WebSocket implementation uvicorn picks in the service's venv. The .pth
# file lets it import torch and numpy from .venv, after its own packages, instead of installing them again.
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.installed: $(VENV)/.runtime requirements-peers.txt
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(PEERS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_service_venv.pth"
	$(PEERS_VENV)/bin/python -m pip install -q -r requirements-peers.txt
	touch $@

peers-venv: $(PEERS_VENV)/.installed

# wrk drives the load benchmark (and its smoke test); from Debian, installed only when missing.
wrk:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# BENTOML_HOME first: bentoml serve fails on one it cannot create before any code of ours runs (core/bentoml_home.py).
serve: $(VENV)/.runtime
	@$(PY) -m core.bentoml_home
	$(VENV)/bin/bentoml serve service:InfernetService --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The browser test drives Debian's Chromium (Playwright cannot download browsers here); installed only when missing.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# arlocal (a local Arweave gateway) for the tests, from the committed lockfile. Its sqlite3 is compiled here:
# node-gyp takes the headers from NODEDIR instead of downloading them.
NODEDIR ?= /usr
ARLOCAL := tools/arlocal/node_modules/.installed
$(ARLOCAL): tools/arlocal/package.json tools/arlocal/package-lock.json
	cd tools/arlocal && npm_config_nodedir=$(NODEDIR) npm ci --no-audit --no-fund
	node -e "require('./tools/arlocal/node_modules/sqlite3')"
	touch $@

arlocal: $(ARLOCAL)

# The image builder: a running Docker engine, else podman and buildah from Debian's packages, installed when missing
# (with runc, which starts containers where crun cannot, and debootstrap for scripts/image.py's base-image stand-in).
image-tools:
	@docker info >/dev/null 2>&1 || { command -v podman && command -v buildah && command -v runc && command -v debootstrap; } >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap; }

# The bento and its OCI image (`bentoml build` + `bentoml containerize`; docs/deploy.md). Prints the name and size.
IMAGE ?= infernet-torch-service:latest
BENTOFILE ?= bentofile.yaml
image: $(VENV)/.runtime image-tools
	$(PY) scripts/image.py --bentofile $(BENTOFILE) --tag $(IMAGE)

test: $(VENV)/.dev lint browser wrk $(ARLOCAL) $(KSERVE_VENV)/.installed $(PEERS_VENV)/.installed image-tools
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.dev $(PEERS_VENV)/.installed wrk
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Bounded soak at concurrency 64 (scripts/soak.py; docs/reliability.md). CI runs SOAK_SECONDS=30 inside `make test`.
SOAK_SECONDS ?= 300
soak: $(VENV)/.dev
	$(PY) scripts/soak.py --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

model: $(VENV)/.dev
	$(PY) scripts/train_iris.py

clean:
	rm -rf $(VENV) $(KSERVE_VENV) $(PEERS_VENV) .pytest_cache .ruff_cache
