# Two commands on a fresh machine: `make run` and `make test`.
# Both create .venv when it is missing (or when pyproject.toml changed) and install the project.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir
# CPU machines: keep jax on the CPU even though libtpu is installed for AOT TPU compiles.
export JAX_PLATFORMS ?= cpu

.PHONY: run test test-fast tpu-check lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[tpu,dev]"
	@touch $(STAMP)

# Calibration and evaluation of the KV-cache precisions on SmolLM2 (quick preset, CPU),
# the memory-headroom sweep on its defaults (Llama-3.1-8B, bf16 weights, v5e-8), the same
# sweep for SmolLM2 on one v5e chip, the summary that joins SmolLM2's capacity and
# accuracy in one table, and the serving comparison on its defaults (chat traffic on
# SmolLM2 with continuous batching, bf16 vs int8 vs 4-bit at one CPU-sized memory budget).
# Each run replaces the previous one's outputs (--overwrite; the binaries refuse a used
# workdir without it).
SUMMARY_FORMATS = bf16,int8,fp8_e4m3,int4,fp8_e5m2,int8-rot,int4-sbf16-rot+sink4+recent252,int4-nu-sbf16-rot+sink4+recent252,int2-nu-sbf16-rot+sink4+recent252
run: $(STAMP)
	$(PY) -m kvtpu.experiments.evaluate --preset=quick --workdir=$(WORKDIR)/evaluate --overwrite
	$(PY) -m kvtpu.experiments.headroom --workdir=$(WORKDIR)/headroom --overwrite
	$(PY) -m kvtpu.experiments.headroom --model=smollm2-135m --weight_dtype=f32 \
	  --accelerator=v5e-1 --mesh=data:1,model:1 --kv_formats=$(SUMMARY_FORMATS) \
	  --workdir=$(WORKDIR)/headroom-smollm2 --overwrite
	$(PY) -m kvtpu.experiments.summary --evaluate_dir=$(WORKDIR)/evaluate \
	  --headroom_dir=$(WORKDIR)/headroom-smollm2 --workdir=$(WORKDIR)/summary --overwrite
	$(PY) -m kvtpu.experiments.serve --workdir=$(WORKDIR)/serve --overwrite

# The full suite (what CI runs). Whole files per worker (tests/conftest.py): a file's tests share their
# module's fixtures and compiled programs instead of compiling them on both workers.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder -q tests

# The edit-loop tier: every test function once (one stable sample of a parametrized
# test's cases), without the tests marked `slow` and without running the docs' Python
# snippets (each starts a fresh interpreter; the tier still checks the docs' commands
# and links). Both tiers keep compiled programs in .cache/jax-tests (tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder -q -m "not slow" -k "not test_python_snippet_runs" --sample-params=1 tests

# On a TPU VM: every kernel compiled against the XLA reference and interpret mode, the
# kernel_bench table, a short evaluation; one verdict line per check. JAX picks the chips
# (JAX_PLATFORMS unset). Off TPU it says so and fails without running anything.
tpu-check: $(STAMP)
	env -u JAX_PLATFORMS $(PY) -m kvtpu.experiments.tpu_check --workdir=$(WORKDIR)/tpu_check --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check kvtpu pallas_kernels models experiments tests

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache .cache
