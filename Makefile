# `make run` starts the auditor on a local demo prefix; `make test` installs everything and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
DEMO := demo
# Test processes: many tests wait on subprocesses and servers, so more workers than cores pays.
TEST_WORKERS ?= 3

.PHONY: run test lint venv bytecode system-deps bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)   # first, so nothing pulls a CUDA build
	$(PY) -m pip install -q -c constraints.txt -e '.[s3,gcs,probe,hf,lightning,test]'
	touch $@

# Compile the package's bytecode, as `pip install` does: an editable install never writes it under
# PYTHONDONTWRITEBYTECODE, and every CLI process would then compile ~30 modules (~90 ms) from source.
bytecode: venv
	$(PY) -m compileall -q auditor > /dev/null

system-deps:
	bash scripts/install-system-deps.sh

# `make run` needs only the package and torch (the demo writes its checkpoints with torch.save): its
# own venv, without the test extra (transformers, lightning, moto, hadolint, kubectl).
RUN_VENV ?= .venv-run

$(RUN_VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/python -m pip install -q --upgrade pip
	$(RUN_VENV)/bin/python -m pip install -q $(TORCH_PIN)   # first, so nothing pulls a CUDA build
	$(RUN_VENV)/bin/python -m pip install -q -c constraints.txt .
	touch $@

run: $(RUN_VENV)/.installed
	mkdir -p $(DEMO)
	$(RUN_VENV)/bin/python -m auditor.demo $(DEMO)/prefix --config-out $(DEMO)/auditor.yaml
	@echo "metrics: http://127.0.0.1:9180/metrics  verdicts: http://127.0.0.1:9180/api/v1/checkpoints  (Ctrl-C stops)"
	$(RUN_VENV)/bin/auditor run --config $(DEMO)/auditor.yaml

# Style, types and the import layers (the contract is [tool.importlinter] in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check auditor tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) scripts/import_graph.py --strict > /dev/null

test: venv bytecode system-deps lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

# Every benchmark at default sizes; prints issue 13's figures as ratios against references measured in
# the same run (benchmarks/README.md). `make test` runs them at tiny sizes (tests/test_bench_smoke.py:
# `run_all.py --smoke`), so a broken benchmark fails the tests; no test asserts a time.
bench: venv system-deps
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(RUN_VENV) $(DEMO) *.egg-info
