# fedlora: `make run` runs the default federated fine-tune, `make test` runs the test suite.
# Both create .venv and install everything on first use (scripts/setup.sh).
.PHONY: setup run test lint bench clean
setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python -m bench.step_time

clean:
	rm -rf .venv results .flwr-home
