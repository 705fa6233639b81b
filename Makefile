# Two commands a newcomer needs: `make reproduce` (everything) and `make test` (CI's command).
# The interpreter: the first of python3.11, python3.12, python3.13, python3 on PATH (3.11 is what CI tests).
PYTHON_BOOT ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,$(if $(shell command -v $(p) 2>/dev/null),$(p))))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
TORCH_PIP_ARGS ?=
export OMP_NUM_THREADS ?= 2

.PHONY: venv test reproduce lab bench pretrain pretrain-scenes clean

venv: $(STAMP)

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "need Python 3.11 or newer on PATH (or make PYTHON_BOOT=/path/to/python3)"; exit 1; }
	@$(PYTHON_BOOT) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON_BOOT) is older than Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev,pipelines]"
	touch $(STAMP)

# Unit tests, then every notebook under nbval in its quick profile (figures go to a temp folder).
test: venv
	$(PY) -m pytest -q tests
	$(if $(NOTEBOOKS),PROGRPO_PROFILE=quick $(PY) -m pytest -q --nbval-lax $(NOTEBOOKS))

# Re-execute every notebook in order, in place, in the full profile, computing everything (PROGRPO_RESULTS=rebuild:
# no stored run is read; each notebook rewrites figures/runs/<notebook>.json.gz, its figures and its part of
# figures/results.json), then the benchmark (figures/bench_cpu.{md,json}, figures/bench_scaling.png), then regenerate
# the generated sections of README.md and docs/. About 70 minutes on 2 cores (55 before notebook 08); notebook 07 took 1.7x as long on a slower CPU.
reproduce: venv
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  PROGRPO_PROFILE=full PROGRPO_RESULTS=rebuild $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=-1 --ExecutePreprocessor.store_widget_state=False "$$nb" || exit 1; \
	done
	$(MAKE) bench
	$(PY) -m progrpo_ref.study.results

# JupyterLab on notebooks/: a notebook opened there runs the full profile and reads the committed runs
# (figures/runs/), so it shows the study's results in minutes. JupyterLab refuses to start as root (as in most
# containers) unless told --allow-root; only pass it then.
LAB_ROOT_FLAG = $(if $(filter 0,$(shell id -u)),--allow-root)
lab: venv
	$(PY) -m jupyter lab $(LAB_ROOT_FLAG) notebooks/

bench: venv
	$(PY) -m progrpo_ref.study.bench --json figures/bench_cpu.json --markdown figures/bench_cpu.md --scaling figures/bench_scaling.png

# Regenerate the committed checkpoints (classifiers, flow model, diffusion model), about 5 minutes on 2 cores.
pretrain: venv
	$(PY) -m progrpo_ref.digits.pretrain

# Regenerate the scenes' committed checkpoints (the learned reward and its twin, the autoencoder, the text-to-image
# flow model), about 25 minutes on 2 cores.
pretrain-scenes: venv
	$(PY) -m progrpo_ref.scenes.pretrain

clean:
	rm -rf $(VENV) *.egg-info
