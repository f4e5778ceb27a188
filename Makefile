# Two entry points: `make run` (the main job) and `make test`. Both build .venv/ first.
PY := .venv/bin/python

.PHONY: run test test-compose lint data compiler kernels bench clean

# torch: `cpu` (default) is the CPU build, from PyTorch's CPU index where it answers, else from pip's own
# sources (a local wheel on the project's build machine); without either it fails rather than take
# PyPI's Linux torch, which is the multi-GB CUDA build. `make TORCH=cuda` takes that CUDA build on purpose.
# torchvision comes with torch: the CPU index's +cpu build where it answers; otherwise PyPI's, a CUDA build
# that pulls no CUDA package itself and runs on the CPU torch through common/data/vision.py's shim.
TORCH ?= cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.venv/.installed: pyproject.toml .ci/constraints.txt
	python3 -m venv .venv
	# torch first and pinned; the constraints file keeps every later step from replacing it
	case "$(TORCH)" in \
	  cpu) if $(PY) -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; \
	       then $(PY) -m pip install -q -c .ci/constraints.txt --extra-index-url $(TORCH_CPU_INDEX) \
	              "torch==2.13.0+cpu" "torchvision==0.28.0+cpu"; \
	       else $(PY) -m pip install -q -c .ci/constraints.txt "torch==2.13.0+cpu" torchvision==0.28.0; fi ;; \
	  cuda) $(PY) -m pip install -q -c .ci/constraints.txt torch==2.13.0 torchvision==0.28.0 ;; \
	  *) echo "TORCH must be cpu or cuda, not '$(TORCH)'" >&2; exit 2 ;; \
	esac
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[test,lint]"
	touch .venv/.installed

# Fashion-MNIST from Debian's package dataset-fashion-mnist (needs root; says how to get it otherwise).
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
	  || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'"

# A C compiler for SAP's kernels, which common/nn/bitkernels.py builds on first use (root installs gcc;
# without one SAP runs its slower torch code).
compiler:
	@command -v $${CC:-cc} >/dev/null \
	  || apt-get install -y -q gcc libc6-dev >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q gcc libc6-dev >/dev/null 2>&1) \
	  || echo "No C compiler: SAP will run its slower torch code. Install one: 'sudo apt-get install gcc'"

# After editing common/nn/bitkernels.c: rewrite bitkernels.c.json, the copy of its text that a Flower app
# bundle carries to the ClientApps (a FAB holds no .c files); tests/test_bitkernels.py fails while it is stale.
kernels: .venv/.installed
	$(PY) -m common.nn.bitkernels --bundle

# The main job: a short FedMef run in Flower's simulation engine (4 SuperNodes), then the result table.
run: .venv/.installed data compiler
	$(PY) -m server.simulation

test: .venv/.installed data compiler
	$(PY) -m pytest -q -m "not compose"

# The compose deployment on podman (tests/test_compose_e2e.py): minutes of image builds and rounds, so
# apart from the suite; CI runs both.
test-compose: .venv/.installed data compiler
	$(PY) -m pytest -q -s -m compose

# Format check, lint (E, F, I, B, UP) and types; `ruff format .` and `ruff check --fix .` mend most of it.
lint: .venv/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: .venv/.installed compiler
	$(PY) -m bench.memory

clean:
	rm -rf .venv
