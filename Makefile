# The two commands a newcomer types: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar100
OUT ?= runs/demo

.PHONY: venv sysdeps demo serve test test-fast bench clean

$(BIN)/splitnet: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build from the index.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/splitnet

venv: $(BIN)/splitnet

demo: venv
	$(BIN)/splitnet run pipelines/configs/demo.yaml data.source=$(DATA) run_dir=$(OUT)

serve: venv  # the tree `make demo` trained, on Ray Serve at http://127.0.0.1:8000 (Ctrl-C stops it)
	$(BIN)/splitnet serve $(OUT)

# Debian's wordnet-base: WordNet names and parents of ImageNet wnids (the data and rehearsal tests
# need it). Installed when missing and we are root with apt-get; otherwise one line says what to do.
sysdeps:
	@if [ ! -f /usr/share/wordnet/data.noun ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's wordnet-base (WordNet class names and parents, needed by the tests)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null; \
	  else \
	    echo "make test needs Debian's wordnet-base: run 'sudo apt-get install -y wordnet-base', then make test again"; \
	    exit 1; \
	  fi; \
	fi

test: venv sysdeps
	$(BIN)/python -m pytest -q tests --durations=15

# the edit-test loop: unit tests only, no Ray, HTTP or subprocess runs (a few minutes on 2 cores)
test-fast: venv
	$(BIN)/python -m pytest -q tests -m "not integration" --durations=10

bench: venv
	$(BIN)/python benchmarks/split_forward.py

clean:
	rm -rf $(VENV) runs
