# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export DS_BUILD_OPS := 0

.PHONY: setup demo test test-fast test-numerics lint fmt bench toy-model toy-drift clean

# Tests that compare floats (marker `numerics`) run once more on the kernels other x86 CPUs use: AVX2 (CPUs
# without AVX-512) and the baseline path, with MKL and oneDNN held to the same instruction sets.
KERNELS_AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
KERNELS_BASELINE := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q
	@$(MAKE) --no-print-directory test-numerics

test-numerics: $(STAMP)
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
		echo "numerics tests on AVX2 kernels ($(KERNELS_AVX2))"; \
		$(KERNELS_AVX2) $(BIN)/python -m pytest -q -m numerics; fi
	@echo "numerics tests on baseline kernels ($(KERNELS_BASELINE))"
	@$(KERNELS_BASELINE) $(BIN)/python -m pytest -q -m numerics

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/long_video_memory.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/recycling_overhead.py
	$(BIN)/python bench/cli_startup.py

# The toy world's base model, from scratch (about an hour on 2 cores): world -> VAE -> shards -> DiT. Writes
# svi_infer/toy_model, the committed weights (README, "The toy world").
TOY := toy_build
toy-model: $(STAMP)
	$(BIN)/python -m data_tools.toy_world $(TOY)/world --videos 48 --seconds 40
	$(BIN)/python -m svi_train.toy_vae $(TOY)/vae --frames-minutes 12 --clips-minutes 15
	$(BIN)/python -m svi_train.pretrain init $(TOY)/init --vae $(TOY)/vae --captions $(TOY)/world
	$(BIN)/python -m data_tools prepare input=$(TOY)/world output=$(TOY)/shards model=toy_wan21_i2v \
		model.path=$(TOY)/init ref_pad_num=0 stride=16 progress=false
	$(BIN)/python -m svi_train.pretrain train $(TOY)/shards $(TOY)/init svi_infer/toy_model --minutes 30

# The ablation in the toy world (docs/toy_world.md): base vs plain LoRA vs recycling LoRA, pixel and latent hand-off.
toy-drift: $(STAMP)
	$(BIN)/python bench/toy_drift.py --reuse

clean:
	rm -rf outputs demo_out .pytest_cache
