# Set-up and the two everyday commands. TORCH pins the CPU wheel that this project's machines
# keep on disk; on a GPU machine pass e.g. `make train TORCH=torch` for the CUDA build.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: train test test-gpu bench figures

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/egrpo train

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Every GPU path in one command (benchmarks/gpu_suite.py, a few minutes on one GPU, nothing downloaded), with a
# Python whose torch has CUDA: this venv made with TORCH=torch, or e.g. GPU_PYTHON=python3 on a machine with torch.
GPU_PYTHON ?= $(PY)
test-gpu: $(if $(filter $(PY),$(GPU_PYTHON)),$(VENV)/.installed)
	$(GPU_PYTHON) benchmarks/gpu_suite.py

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

# The figures and tables of the README and docs/results.md, regenerated from scratch (about 15 minutes on 2 cores): the main job, every
# method trained for the same 20 iterations from the shipped base, plus runs on the preference reward
# alone (it gets hacked) and with alignment beside it (the paper's HPS vs HPS + CLIP). Runs go to
# runs/figures/, which this target replaces.
FIGS := docs/figures
RUNS := runs/figures
METHODS := egrpo g2rpo tempflow flowgrpo flowgrpo-fast dancegrpo mixgrpo branchgrpo
EGRPO := $(VENV)/bin/egrpo
empty :=
comma := ,
LABELS := base,$(subst $(empty) $(empty),$(comma),$(METHODS))

figures: $(VENV)/.installed
	rm -rf $(RUNS)
	$(EGRPO) train --no-progress output_dir=$(RUNS)/main
	cp $(RUNS)/main/samples.png $(RUNS)/main/reward_curve.png $(RUNS)/main/plan.png docs/
	$(EGRPO) eval base $(RUNS)/main --out docs/results/main --labels "base,trained (60 iterations)"
	$(EGRPO) figures entropy --out $(FIGS)/entropy.png
	$(EGRPO) figures spread --batches 4 --out $(FIGS)/spread.png
	for m in $(METHODS); do \
		$(EGRPO) train --method $$m --no-progress train.iterations=20 eval.every=5 output_dir=$(RUNS)/$$m || exit 1; \
	done
	$(EGRPO) figures curves $(addprefix $(RUNS)/,$(METHODS)) --out $(FIGS)/curves.png
	$(EGRPO) figures grid base $(addprefix $(RUNS)/,$(METHODS)) --rows 10 --out $(FIGS)/grid.png \
		--labels $(LABELS)
	$(EGRPO) eval base $(addprefix $(RUNS)/,$(METHODS)) --out docs/results/methods \
		--labels $(LABELS)
	$(EGRPO) train --no-progress reward.alignment=0 reward.quality=1 train.iterations=30 output_dir=$(RUNS)/quality-only
	$(EGRPO) train --no-progress reward.alignment=4 reward.quality=1 train.iterations=30 output_dir=$(RUNS)/quality+alignment
	$(EGRPO) train --no-progress reward.alignment=1 reward.quality=1 train.reward_normalization=per_reward \
		train.iterations=30 output_dir=$(RUNS)/quality+alignment-per-reward
	$(EGRPO) figures failures base $(RUNS)/quality-only --reward quality --check alignment --out $(FIGS)/failures.png
	$(EGRPO) figures failures base $(RUNS)/quality+alignment --reward quality --check alignment \
		--out $(FIGS)/failures-counterbalanced.png
	$(EGRPO) figures failures base $(RUNS)/quality+alignment-per-reward --reward quality --check alignment \
		--out $(FIGS)/failures-per-reward.png
	$(EGRPO) eval base $(RUNS)/quality-only $(RUNS)/quality+alignment $(RUNS)/quality+alignment-per-reward \
		--out docs/results/hacking \
		--labels "base,quality only,quality + 4 alignment,quality + alignment (per-reward z-scores)"
	$(PY) tools/sync_readme.py
