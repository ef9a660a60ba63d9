# The two commands of the README: `make run` (set up, then run the pipeline on the embedded
# default corpus) and `make test` (set up, then run the test suite). Both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= conf/local.yaml
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup:
	@bash deploy/setup.sh

run: setup
	$(VENV)/bin/clustermix run --config $(CONFIG)

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test:
	@bash deploy/setup.sh --with-test-deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check lib jobs tests bench

clean:
	rm -rf lake .pytest_cache
