# Two entry points: `make run` (the main job) and `make test`. Both build .venv/ first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test data bench clean

$(STAMP): pyproject.toml .ci/constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; the constraints file keeps every later step from replacing it
	$(PY) -m pip install -q -c .ci/constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package (needs root; prints how to get it otherwise).
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { [ "$$(id -u)" = 0 ] && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; } || \
	  echo "Fashion-MNIST not installed: run 'sudo apt-get install dataset-fashion-mnist' or pass a data folder"

run: $(STAMP) data
	$(PY) -m bench.train

test: $(STAMP) data
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.memory

clean:
	rm -rf .venv
