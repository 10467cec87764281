# The two commands a newcomer types: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar100
OUT ?= runs/demo

.PHONY: venv demo serve test bench clean

$(BIN)/splitnet: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build from the index.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/splitnet

venv: $(BIN)/splitnet

demo: venv
	$(BIN)/splitnet plan --arch wrn-16-8 --split 2-2-2 --num-classes 100
	$(BIN)/splitnet run pipelines/configs/demo.yaml data.source=$(DATA) run_dir=$(OUT)

serve: venv  # the tree `make demo` trained, on Ray Serve at http://127.0.0.1:8000 (Ctrl-C stops it)
	$(BIN)/splitnet serve $(OUT)

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python benchmarks/split_forward.py

clean:
	rm -rf $(VENV) runs
