# The two commands of the README: `make run` (local stack) and `make test`. Each installs what it needs
# into .venv on first use (and again when a requirements file changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test check bench infra deploy clean

# The pinned requirements are installed by uv (pinned here), not pip: the same versions, in 9 s instead of
# 52 s on a fresh machine (pip spends most of it byte-compiling every installed file; a module is
# compiled when first imported instead), which is a fifth of `make test`'s 5 minutes. pip stays in the
# venv (`chalice package` uses it).
UV_VERSION := 0.13.9
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) -m sandbox.local_stack

# Two processes (pytest-xdist): the suite waits on loopback HTTP more than it computes. The console's
# browser tests drive Debian's chromium through chromium-driver: installed first when missing (root, or sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test: $(VENV)/.installed
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver; }
	$(PY) -m pytest -q -n 2

# The fast tier for the edit-test loop (under a minute): no moto_server, no local stack.
check: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not stack"

# The benchmarks of BENCHMARKS.md (about 8 minutes): each prints a table with its ratio to a floor.
bench: $(VENV)/.installed
	$(PY) -m bench.run_all

# The stacks of infra/*.yaml in AWS for a stage, through change sets (idempotent; see README "Deploy"):
# make infra STAGE=prod [ALARM_EMAIL=ops@example.com] [LOG_RETENTION_DAYS=30]
infra: $(VENV)/.installed
	$(PY) -m tools.infra --stage $(or $(STAGE),dev)

# Everything a stage needs, in order, each step idempotent (README "Deploy"): the stacks, the admin token
# (made once, never shown), the functions, API Gateway's own answers in the app's JSON shape (each
# `chalice deploy` resets them, so the two go together), then the URLs to give the CRMs.
# make deploy STAGE=prod [ALARM_EMAIL=ops@example.com]
deploy: $(VENV)/.installed
	$(PY) -m tools.infra --stage $(or $(STAGE),dev)
	$(PY) -m tools.deploy token --stage $(or $(STAGE),dev)
	$(VENV)/bin/chalice deploy --stage $(or $(STAGE),dev)
	$(PY) -m tools.gateway_responses --stage $(or $(STAGE),dev)
	$(PY) -m tools.deploy urls --stage $(or $(STAGE),dev)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
