# One command sets up and runs the main job; one runs the tests.  Everything lives in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch must be installed before anything that depends on torch, or pip pulls
# the (multi-GB) CUDA build.  Override on machines that need another build.
TORCH ?= torch==2.13.0
DEMO := runs/first-run

.PHONY: setup browser demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# OpenAI's own model.py and tokenizer, the reference the tests compare against.  Installed
	# without dependencies: its torchvision requirement would replace the CPU torch.
	$(PY) -m pip install --quiet --no-deps clip-anytorch==2.6.0
	# OpenCLIP's zero-shot classifier builder, the peer of benchmarks/bench_zeroshot.py (loaded by
	# file: the package itself needs torchvision).
	$(PY) -m pip install --quiet --no-deps open_clip_torch==3.3.0
	# timm: the image towers of OpenCLIP's SigLIP, PE and EVA models (model code only; the
	# tests stand in for its torchvision imports, see tests/families.py).
	$(PY) -m pip install --quiet --no-deps timm==1.0.31
	# CLIP_benchmark: its prompt data and metric functions are checked against ours (its model
	# loaders need open_clip and torchvision, which the tests never import).
	$(PY) -m pip install --quiet --no-deps clip_benchmark==1.6.2
	# clip-retrieval: its ClipClient is driven against the server's clip-retrieval API (loaded by
	# file: the package itself imports its whole back-end, flask, faiss, pandas and more).
	$(PY) -m pip install --quiet --no-deps clip-retrieval==2.45.0
	touch $@

demo: setup
	$(VENV)/bin/clipforge train --output $(DEMO)

# Debian's headless Chromium drives the search page's browser test (Playwright uses it as is:
# nothing is downloaded).  Installed when missing and apt-get can run; else that test skips.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q chromium >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }; }; } \
	  || echo "note: chromium is not installed: the browser test will be skipped"

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_zeroshot.py

clean:
	rm -rf $(VENV) runs
