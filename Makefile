# Two commands for a new user on a fresh machine with Python 3.11:
#   make demo   create .venv, install the pipeline, run the whole DAG on the embedded default
#   make test   the same set-up plus the test extra (pytest, TensorFlow for the Keras import tests,
#               the real-model and reference-attack packages), then the test suite
#   make test-fast  the suite without the tests marked slow (workflow, demo, real-model runs) or slurm
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Snakemake's cores: every CPU of the machine unless pinned (make demo CORES=2).
CORES  ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: env env-test demo test test-fast report lint clean

env: $(STAMP)
env-test: $(TEST_STAMP)

# torch and torchvision are pinned together in pyproject.toml and come from the
# same index: a CPU-only torch with PyPI's CUDA torchvision fails at import.
# build-constraints.txt caps setuptools below 81 while building sdists: visdom (needed by
# adv-lib, the reference attacks) still imports pkg_resources in its setup.py.
# uv installs the same pinned set as pip (checked with pip freeze: identical) in under a
# minute where pip takes about four: torch's CUDA wheels are 6 GB unpacked.
# --compile-bytecode: like pip, write the .pyc files while installing; a job would otherwise
# compile torch afresh each time under PYTHONDONTWRITEBYTECODE.
# `make env INSTALLER=pip` installs with pip instead.
# The demo needs the pipeline's own dependencies only; the test extra (TensorFlow and the Keras
# model libraries among them) is installed by the test targets, on top of the same .venv.
INSTALLER ?= uv
UV_VERSION := 0.13.9
ifeq ($(INSTALLER),pip)
INSTALL = PIP_CONSTRAINT=$(CURDIR)/build-constraints.txt $(BIN)/pip install --quiet -e
else
INSTALL = UV_BUILD_CONSTRAINT=$(CURDIR)/build-constraints.txt $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e
endif
$(STAMP): pyproject.toml build-constraints.txt
	$(PYTHON) -m venv $(VENV)
ifneq ($(INSTALLER),pip)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
endif
	$(INSTALL) .
	$(BIN)/python -c "import torch, torchvision, timm, snakemake; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'snakemake', snakemake.__version__)"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(INSTALL) '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(TEST_STAMP)
	$(BIN)/pytest

test-fast: $(TEST_STAMP)
	$(BIN)/pytest -m 'not slow and not slurm'

report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --report report.html

lint: $(TEST_STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check .

clean:
	rm -rf results figures logs .snakemake report.html
