# make run : set up .venv and run the main job (LOOP, K=4, on the embedded world's color task)
# make test: set up .venv and run the test suite
.PHONY: setup run test bench

export HF_HUB_OFFLINE := 1
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export MALLOC_TOP_PAD_ := 1073741824

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/loopdiff train

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/epoch.py
