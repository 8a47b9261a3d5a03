# The two commands a newcomer needs:
#   make serve   install everything (first run: ~10 min, compiles llama.cpp) and start the server
#   make test    install everything and run the test suite
.PHONY: install serve test lint bench

STAMP := .venv/.fmserve-installed
PORT ?= 8080
HOST ?= 127.0.0.1

$(STAMP): pyproject.toml constraints.txt scripts/install.sh scripts/llama_cmake_args.sh
	scripts/install.sh
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	.venv/bin/fmserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	.venv/bin/python -m pytest

lint: $(STAMP)
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy src

bench: $(STAMP)
	.venv/bin/python bench/bench_core.py
