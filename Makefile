# make run : set up .venv and run the main job (LOOP, K=4, on the embedded world's aesthetic task: embedded-aesthetic.yaml)
# make test: set up .venv and run the test suite
.PHONY: setup setup-test run test bench

export HF_HUB_OFFLINE := 1
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export MALLOC_TOP_PAD_ := 1073741824

setup:
	@bash scripts/setup.sh

# the test extra adds pytest, the OCR engine and deepspeed (which accelerate imports in every run once installed)
setup-test:
	@bash scripts/setup.sh test

run: setup
	.venv/bin/loopdiff train

test: setup-test
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/epoch.py
