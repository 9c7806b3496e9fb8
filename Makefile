# Two targets that each work alone on a fresh machine: they create .venv and install what they need.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
CONFIG  ?= configs/tiny_dpop.yaml
ARGS    ?=

.PHONY: train test install clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	rm -f .venv/.installed-*; touch $(STAMP)

install: $(STAMP)

# The main job: DPOP on the shipped sample data (tiny model, real tokenizer, CPU), checkpoints,
# HF export in <workdir>/hf and a plot in <workdir>/metrics.png.
train: $(STAMP)
	$(PY) tools/make_sample_data.py --check || $(PY) tools/make_sample_data.py
	$(PY) -m jsmaug.train $(CONFIG) $(ARGS)

# Two pytest workers (CI has 2 cores; compiling the tiny programs is most of the time). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --durations=15

clean:
	rm -rf .venv runs .jax_cache .pytest_cache
