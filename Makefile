# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the builds this project is tested with; override on other machines,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# `cpu` pulls faiss-cpu; use EXTRAS=gpu,dev on a CUDA machine to get faiss-gpu instead.
EXTRAS ?= cpu,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test test-fast bench clean experiments

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	touch $@

# dvc runs stage commands with `python`; the venv's bin first on PATH makes that ours.
demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(PY) -m pipeline.summary metrics/eval.json

# What CI runs: every test, the end-to-end `dvc repro` and kill -9 resume tests included. One worker per core
# (pytest-xdist; each worker runs torch on one thread, tests/conftest.py), whole files per worker so that a
# module's fixtures are built once: 9 minutes on 2 cores where one process took 11 (before the suite grew).
TEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -q -x --durations=15 -n $(TEST_WORKERS) --dist loadfile

# The edit-test loop: everything but the tests marked `slow` (whole pipeline, subprocess kill/resume).
test-fast: install
	$(PY) -m pytest -q -x --durations=15 -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The paper's comparison rows (Tables 4, 5, 7, 10; GeoCLIP fine-tuned and zero-shot) as DVC experiments of this
# pipeline, then metrics/experiments.csv and .md. Resumable; about 55 minutes on the demo (pipeline/experiments.py).
experiments: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pipeline.experiments

bench: install
	$(PY) benchmarks/frechet.py

clean:
	rm -rf cache metrics plots dvclive .pytest_cache
