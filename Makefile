# Two entry points: `make demo` runs the whole stack, `make test` runs every check CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test venv mosquitto chromium faketime lint wasm

$(BIN)/torpor: pyproject.toml
	@# Debian ships venv support in a separate package: install it when venv creation fails.
	$(PYTHON) -m venv $(VENV) || (rm -rf $(VENV) && $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV))
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/torpor

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v mosquitto >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto)
	@# The attack tests use Debian's own clients, which share no code with Torpor.
	@command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto-clients)

# The 32-bit MicroPython (WebAssembly port, run by Node.js) that measures the wake's heap at a
# chip's word size (tools/sim/wasm.py). Debian's nodejs runs it (npm is not needed, nor its
# docs); the pinned package comes straight from the npm registry, checked against the sha512
# the registry states, and is left alone once present and intact (tools/sim/wasm_port.py).
wasm: venv
	@# The fetch is HTTPS: Debian keeps the roots it checks the registry with in ca-certificates.
	@command -v node >/dev/null 2>&1 && [ -s /etc/ssl/certs/ca-certificates.crt ] || \
		($(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends nodejs ca-certificates)
	$(BIN)/python -m tools.sim.wasm_port

chromium:
	@# The web page's browser tests drive Debian's headless chromium over its DevTools protocol.
	@command -v chromium >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

faketime:
	@# `torpor soak` runs the gateway, its Mosquitto and the sim nodes on one compressed clock
	@# through libfaketime (tools/sim/soak.py, docs/soak.md).
	@ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || \
		ls /usr/lib/faketime/libfaketime.so.1 >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq faketime)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy --strict gateway tools

demo: venv mosquitto
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/torpor demo

test: venv mosquitto chromium faketime wasm lint
	$(BIN)/torpor proto check
	PATH="$(CURDIR)/$(BIN):$$PATH:/usr/sbin" $(BIN)/pytest -n 2 -q
