# EP + DeepSpeed ZeRO-3 fork of transformers: a patch queue on the release pinned in upstream.toml.
# `make test` and `make demo` set everything up themselves (virtual environment, pinned installs, assembly).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The torch every install path pins (an unpinned torch resolves to a multi-GB CUDA build). CI and `make test` use the
# CPU wheel; `make test-torch-next` builds a second environment on the newest torch installable here.
TORCH ?= 2.13.0
TORCH_NEXT ?= 2.14.1
# requirements/constraints.txt with its torch line set to $(TORCH), written into the environment it constrains
VENV_CONSTRAINTS := $(VENV)/constraints.txt
CONSTRAINTS := -c $(VENV_CONSTRAINTS)
PATCHQ := $(PYTHON) utils/patchq.py
PYTEST_ARGS ?=

# One JIT-extension cache for every process, built once by `make install` (DeepSpeed's CPU comm op, 45-60 s).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: help install assemble check diff refresh rebase pr-series test test-fast test-multinode test-upstream demo \
	test-torch-next upstream-status \
	bench-load bench-load-dense bench-save bench-export bench-train sweep-families plan-memory check-memory-plan bench-expert-load \
	test-expert-load test-cpu-adam clean

help:
	@echo "make test      set up and run the test suite (what .ci/run runs)"
	@echo "make demo      set up and run the 2-rank CPU EP + ZeRO-3 demo"
	@echo "make test-multinode  the multi-node tests: 2 virtual nodes (network namespaces, own disks; root), 3 launchers;"
	@echo "                     and the 4-rank chain of topology changes"
	@echo "make test-upstream  upstream's test mixins on pristine and on the fork: fail on a test only pristine passes"
	@echo "make install   create $(VENV): torch==$(TORCH), deepspeed 0.19.8, accelerate, test tools, this fork (-e)"
	@echo "make test-torch-next  the suite in a second environment on torch $(TORCH_NEXT) (PYTEST_ARGS=...); CI stays on $(TORCH)"
	@echo "make upstream-status  newest transformers / accelerate / DeepSpeed / torch vs the pins; dry-run rebase onto a newer transformers"
	@echo "make assemble  src/transformers = pristine release + patches/series (FORCE=1 drops unrefreshed edits)"
	@echo "make check     the series applies exactly, headers are complete, no patch adds a file, no edit is left outside patches/"
	@echo "make diff      the reviewable diff of src/transformers against the pristine release"
	@echo "make refresh   write edits of src/transformers back into patches/ (PATCH=<name> or NEW=<NNNN-concern>)"
	@echo "make rebase    VERSION=x.y.z SHA256=<sdist sha256> [DRY_RUN=1]: move the series onto another release (three-way);"
	@echo "               after resolving a conflict in build/rebase/repo: make rebase CONTINUE=1 (or ABORT=1)"
	@echo "make pr-series the patches proposed upstream as a git format-patch series + PR.md in build/pr-series/"
	@echo "make bench-load  2-rank CPU load benchmark: EP + ZeRO-3 vs EP-only vs dense ZeRO-3 (BENCH_ARGS=\"--size large\")"
	@echo "make bench-load-dense  2-rank CPU dense ZeRO-3 load: shard-on-read vs upstream ZeRO-3 path vs no DeepSpeed"
	@echo "make bench-save  2/4-rank CPU save, per-expert + fused layouts: EP + ZeRO-3 save_pretrained vs one process (BENCH_ARGS=\"--nproc 2\")"
	@echo "make bench-export  offline export of a 2-rank EP ZeRO-3 checkpoint to an HF checkpoint: peak memory at 2 model sizes"
	@echo "make sweep-families  EP + ZeRO-3 load/train/save parity of every MoE family in the sweep (FAMILIES=...;"
	@echo "                     SWEEP_STAGE=2: under ZeRO-2)"
	@echo "make bench-train 2-rank CPU training benchmark: EP + ZeRO-3/2/1 vs ZeRO-3/2 without EP vs DeepSpeed AutoEP + ZeRO-3/2"
	@echo "                 (BENCH_ARGS=\"--variants D B C\": the ZeRO-3 ones only; \"--stages 2\"; \"--repeats 5\")"
	@echo "make plan-memory ARGS=\"<model or config> --world-size W --ep-size P [--stage S] [--gpu-memory GiB] ...\"  per-rank memory of EP + ZeRO-1/2/3, which stages fit (no weights read)"
	@echo "make check-memory-plan  the planner against measured CPU runs: 2 and 4 ranks, EP 1/2/4, ZeRO-1/2/3, offload (about 8 min)"
	@echo "make bench-expert-load  bench-train's model with expert load metrics on vs off, collected every step"
	@echo "make test-expert-load   every expert load metrics test: Trainer and accelerate, with and without EP, 2 and 4 ranks"
	@echo "make test-cpu-adam      EP + ZeRO-2 with DeepSpeed's CPU Adam at parity (builds its cpu_adam op first)"
	@echo "make clean     remove $(VENV), caches and the assembled files of src/transformers (own modules stay)"

install: $(VENV)/.installed

# torch first and pinned (an unpinned torch resolves to a multi-GB CUDA build); deepspeed is an sdist that builds
# against the installed torch, hence --no-build-isolation after it.
$(VENV)/.installed: setup.py pyproject.toml upstream.toml requirements/constraints.txt requirements/dev.txt \
		requirements/ecosystem.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sed 's/^torch==.*/torch==$(TORCH)/' requirements/constraints.txt > $(VENV_CONSTRAINTS)
	$(PIP) install $(CONSTRAINTS) torch==$(TORCH)
	$(PIP) install $(CONSTRAINTS) -r requirements/dev.txt
	$(PIP) install $(CONSTRAINTS) --no-build-isolation deepspeed==0.19.8
	$(PIP) install $(CONSTRAINTS) -e .
	$(PIP) install $(CONSTRAINTS) -r requirements/ecosystem.txt
	$(PY) utils/build_deepspeed_ops.py
	touch $@

assemble:
	$(PATCHQ) assemble $(if $(FORCE),--force)

check:
	$(PATCHQ) check

diff:
	@$(PATCHQ) diff

refresh:
	$(PATCHQ) refresh $(if $(PATCH),--patch $(PATCH)) $(if $(NEW),--new $(NEW))

# A three-way git rebase in build/rebase/ (README, "Moving to a new upstream release"). On a conflict it stops: resolve
# the named file there, then CONTINUE=1; ABORT=1 drops the rebase, leaving patches/ and the pin as they were.
rebase:
ifneq ($(CONTINUE),)
	$(PATCHQ) rebase --continue
else ifneq ($(ABORT),)
	$(PATCHQ) rebase --abort
else
	@test -n "$(VERSION)" -a -n "$(SHA256)" || { echo "usage: make rebase VERSION=x.y.z SHA256=<sdist sha256> [DRY_RUN=1] | make rebase CONTINUE=1 | make rebase ABORT=1"; exit 2; }
	$(PATCHQ) rebase $(VERSION) $(SHA256) $(if $(DRY_RUN),--dry-run)
endif

# The patches proposed upstream (`Forwardable: yes`) and the own modules they use, as a `git format-patch` series with a
# PR description (build/pr-series/), checked with `git am` on the pristine release. AUTHOR="Name <email>" (default: git's).
pr-series:
	$(PATCHQ) pr-series $(if $(AUTHOR),--author "$(AUTHOR)")

test: install
	$(PATCHQ) assemble --quiet
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: install
	$(PATCHQ) assemble --quiet
	$(PY) examples/ep_deepspeed/run_demo.py

# The suite on the newest torch installable here ($(TORCH_NEXT): a CUDA build, about 4 GB with the CUDA libraries it
# pulls, which run on CPU here) in its own environment and JIT-extension cache; CI stays on the $(TORCH) CPU wheel.
test-torch-next:
	$(MAKE) test VENV=.venv-torch-$(TORCH_NEXT) TORCH=$(TORCH_NEXT) \
		TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions-$(TORCH_NEXT) PYTEST_ARGS="$(PYTEST_ARGS)"

# Newest transformers / accelerate / DeepSpeed / torch on the registry against the pins, and a dry-run rebase onto a
# newer transformers (utils/upstream_status.py; exit 0 whatever the answer, 2 when the registry cannot be asked).
upstream-status:
	$(PYTHON) utils/upstream_status.py $(STATUS_ARGS)

# The quick loop while developing: no multi-process or slow tests.
test-fast: install
	$(PATCHQ) assemble --quiet
	$(PY) -m pytest tests -m "not multiprocess and not slow" $(PYTEST_ARGS)

# The multi-node tests alone (tests/deepspeed/test_ep_zero3_multinode.py: 2 virtual nodes, each in its own network
# namespace with its own disk; needs root): load, train, save, resume under torchrun, accelerate and DeepSpeed's
# launcher, and the network faults (`make test` runs two of the five); and the 4-rank chain of topology changes
# (tests/deepspeed/test_ep_zero3_reshard.py, marker `topology`). About 5 min here.
test-multinode: install
	$(PATCHQ) assemble --quiet
	EPFORK_MULTINODE_FULL=1 $(PY) -m pytest tests -m "multinode or topology" $(PYTEST_ARGS)

# Upstream's own tests as a regression gate (utils/upstream_tests.py): the mixins of the pinned sdist, extracted into
# build/upstream-tests/, run through the project's model testers (tests/upstream/) for the MoE families on the pristine
# release and on the fork; exit status 1 if the fork fails a test that pristine passes. About 9 min here (README).
# UPSTREAM_ARGS="--families mixtral -k test_save_load", or "--selection full" for every test (hours on 2 cores).
UPSTREAM_ARGS ?=
test-upstream: install
	$(PATCHQ) assemble --quiet
	$(PY) utils/upstream_tests.py $(UPSTREAM_ARGS)

# Load benchmark (benchmarks/load_ep_zero3.py): 2 CPU ranks, 4 cases, about 3-4 min; JSON in benchmarks/results/.
# BENCH_ARGS="--size large" loads the same model at 2.6 GB (built once under .cache/bench/, 2 x 2.6 GB of disk).
BENCH_ARGS ?=
bench-load: install
	$(PATCHQ) assemble --quiet
	$(PY) benchmarks/load_ep_zero3.py $(BENCH_ARGS)

# Save benchmark (benchmarks/save_ep_zero3.py): the load benchmark's Qwen3-MoE (experts saved per expert) and a gpt-oss
# of its size (experts saved fused), EP + ZeRO-3 on 2 and 4 CPU ranks vs a single process, about 4-5 min (BENCH_ARGS=
# "--layout per-expert --nproc 2": the 2-rank Qwen3-MoE part alone, about 1 min); JSON in benchmarks/results/.
bench-save: install
	$(PATCHQ) assemble --quiet
	$(PY) benchmarks/save_ep_zero3.py $(BENCH_ARGS)

# Export benchmark (benchmarks/export_zero_checkpoint.py): ZeRO-3 checkpoints of a 461 MB and a 2.6 GB Qwen3-MoE
# (2 CPU ranks, EP 2, built once under .cache/bench/), exported offline, streamed vs in memory; about 10 min the first
# time (the checkpoints), 3 min after; JSON in benchmarks/results/.
bench-export: install
	$(PATCHQ) assemble --quiet
	$(PY) benchmarks/export_zero_checkpoint.py $(BENCH_ARGS)

# Dense ZeRO-3 load benchmark (benchmarks/load_zero3_dense.py): 477 MB Llama, 2 CPU ranks, shard-on-read vs upstream's
# ZeRO-3 path vs a load without DeepSpeed, about 1-2 min; JSON in benchmarks/results/.
bench-load-dense: install
	$(PATCHQ) assemble --quiet
	$(PY) benchmarks/load_zero3_dense.py $(BENCH_ARGS)

# Family sweep (benchmarks/family_sweep/): tiny model of each MoE family with an EP plan, 2 CPU ranks each, load /
# train / save parity with one process, about 13 min (51 configurations); FAMILIES="gpt_oss deepseek_v3" for some.
FAMILIES ?=
sweep-families: install
	$(PATCHQ) assemble --quiet
	OMP_NUM_THREADS=1 SWEEP_STAGE=$(or $(SWEEP_STAGE),3) $(PY) -m benchmarks.family_sweep.run_sweep $(FAMILIES)

# Training benchmark (benchmarks/train_ep_zero3.py): 2 CPU ranks, 7 variants x 3 interleaved repeats, about 10 min:
# EP + ZeRO-3 (D), ZeRO-3 without EP (B), AutoEP + ZeRO-3 (C), and (issue 24) EP + ZeRO-2 (D2) and ZeRO-1 (D1),
# ZeRO-2 without EP (B2), AutoEP + ZeRO-2 (C2); the memory planner's
# per-rank figures printed beside the measured ones; JSON in benchmarks/results/. BENCH_ARGS="--variants D B C" the
# ZeRO-3 ones alone (about 4 min), "--stages 2" the ZeRO-2 ones, "--repeats 5" the docs' "Which ZeRO stage" run
# (about 15 min); "--profile" adds a torch.profiler run of D, C, D2 and C2; "--nproc 4 --ep-size 2 --timeout 240"
# runs EP x data parallelism on 4 ranks.
bench-train: install
	$(PATCHQ) assemble --quiet
	$(PY) benchmarks/train_ep_zero3.py $(BENCH_ARGS)

# Memory planner (integrations/deepspeed_expert_parallel_memory.py): per-rank ZeRO state, working buffers, load and
# save peaks of an EP + ZeRO run from a model id, directory or config JSON, on the meta device; the stage planned in
# detail (--stage, or the --deepspeed config's) and stages 1, 2 and 3 side by side (--gpu-memory GiB: which fit).
# ARGS="examples/ep_deepspeed/memory_configs/qwen3_30b_a3b.json --world-size 16 --ep-size 8 --offload-optimizer"
ARGS ?=
plan-memory: install
	$(PATCHQ) assemble --quiet
	$(PY) -m transformers.integrations.deepspeed_expert_parallel_memory $(ARGS)

# The planner's figures against measured CPU runs, 2 and 4 ranks, ZeRO-3 and ZeRO-1/2 (CI
# runs the 2-rank EP 2 part only), about 8 min.
check-memory-plan: install
	$(PATCHQ) assemble --quiet
	EPFORK_MEMORY_PLAN_SWEEP=1 $(PY) -m pytest tests/deepspeed/test_ep_zero3_memory_plan.py -v -s $(PYTEST_ARGS)

# Every expert load metrics test (tests/deepspeed/test_expert_load_metrics.py): Trainer and accelerate, with and
# without EP, 2 and 4 ranks, the negative control; CI runs part of them. About 7 min.
test-expert-load: install
	$(PATCHQ) assemble --quiet
	EPFORK_EXPERT_LOAD_FULL=1 $(PY) -m pytest tests/deepspeed/test_expert_load_metrics.py $(PYTEST_ARGS)

# EP under ZeRO stage 2 with the optimizer offloaded and DeepSpeed's CPU Adam (the config's AdamW), at parity with one
# process: DeepSpeed compiles its cpu_adam op first (about 1.5 min here, cached in TORCH_EXTENSIONS_DIR), which CI does
# not build. About 2.5 min.
test-cpu-adam: install
	$(PATCHQ) assemble --quiet
	EPFORK_CPU_ADAM=1 $(PY) -m pytest tests/deepspeed/test_ep_zero12.py -k cpu_adam $(PYTEST_ARGS)

bench-expert-load: install
	$(PATCHQ) assemble --quiet
	$(PY) benchmarks/train_ep_zero3.py --variants D M --repeats 4 $(BENCH_ARGS)

# src/transformers also holds the fork's own (tracked) modules: patchq removes only what assembly made.
clean:
	$(PATCHQ) clean
	rm -rf $(VENV) .cache src/*.egg-info src/.assemble-* src/.transformers.old .pytest_cache
