# Two entry points: `make run` (the main job) and `make test`. Both build .venv/ first.
PY := .venv/bin/python

.PHONY: run test data compiler bench clean

.venv/.installed: pyproject.toml .ci/constraints.txt
	python3 -m venv .venv
	# torch first and pinned: the CPU wheel; the constraints file keeps every later step from replacing it
	$(PY) -m pip install -q -c .ci/constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[test]"
	touch .venv/.installed

# Fashion-MNIST from Debian's package dataset-fashion-mnist (needs root; says how to get it otherwise).
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
	  || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'"

# A C compiler for SAP's kernels, which common/bitkernels.py builds on first use (root installs gcc;
# without one SAP runs its slower torch code).
compiler:
	@command -v $${CC:-cc} >/dev/null \
	  || apt-get install -y -q gcc libc6-dev >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q gcc libc6-dev >/dev/null 2>&1) \
	  || echo "No C compiler: SAP will run its slower torch code. Install one: 'sudo apt-get install gcc'"

# The main job: a short FedMef run in Flower's simulation engine (4 SuperNodes), then the result table.
run: .venv/.installed data compiler
	$(PY) -m bench.simulation

test: .venv/.installed data compiler
	$(PY) -m pytest -q

bench: .venv/.installed compiler
	$(PY) -m bench.memory

clean:
	rm -rf .venv
