# Two entry points: `make run` (the main job) and `make test`. Both build .venv/ first.
PY := .venv/bin/python

.PHONY: run test data bench clean

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

# The main job: a short FedMef run in Flower's simulation engine (4 SuperNodes), then the result table.
run: .venv/.installed data
	$(PY) -m bench.simulation

test: .venv/.installed data
	$(PY) -m pytest -q

bench: .venv/.installed
	$(PY) -m bench.memory

clean:
	rm -rf .venv
