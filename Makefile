PYTHON ?= .venv/bin/python

.PHONY: bench
# Benchmark ours vs upstream psycopg-pool 3.3.3 and write BENCHMARKS.md (see bench/README.md).
# Extra options: make bench BENCH_ARGS="--quick" or BENCH_ARGS="--only overhead --pairs 5"
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)
