# make test: what CI runs. make demo: the bundled CIFAR-10 demo. make bench / make evidence: measurements.
# make tables: the results tables (docs/results.md, RESULTS.md) from the committed per-run summaries.
# Every target creates .venv from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench gpu-check evidence evidence-tiny evidence-generated evidence-switch evidence-classes tables picture paper-tiny clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q test_hald.py test_tools.py test_paper_tiny.py

demo: $(VENV)/installed
	$(PY) -m pip install --quiet matplotlib  # optional: the pictures (curves.png, comparison.png)
	$(PY) hald.py

bench: $(VENV)/installed
	$(PY) tools/bench.py

# on a CUDA machine: the benchmark at the GPU sizes, the demo and the tests on CUDA (about 8 min on an H100 before the whole-step experiment and the profile were added)
gpu-check:
	OUT=runs/gpu-check bash tools/gpu_check.sh

# CIFAR-10 evidence: CIFAR=path/to/cifar10 (ImageFolder with test/); about 5.5 h on 2 CPU cores, plus about
# 8 h for the students (ResNet-18: 20-40 min a run; the BatchNorm ConvNet's splits also at s = 10) and the ceilings
CIFAR ?= ../shared/data/cifar10
evidence: $(VENV)/installed
	$(PY) tools/evidence.py --cifar $(CIFAR) --group main --jobs 2
	$(PY) tools/evidence.py --cifar $(CIFAR) --group suspects --crops 1,2 --jobs 2
	$(PY) tools/evidence.py --cifar $(CIFAR) --group more --crops 1,2 --jobs 2
	$(PY) tools/evidence.py --cifar $(CIFAR) --group more --only "soft-only, T 4|label smoothing 0.1, T 4|soft-only, crop scale 0.35, T 4" --crops 10 --jobs 2
	$(PY) tools/evidence.py --cifar $(CIFAR) --group students --crops 1,2 --jobs 2
	$(PY) tools/evidence.py --cifar $(CIFAR) --group students --crops 10 --jobs 2 --only "ConvNet-3 BN: soft-only, T 4|ConvNet-3 BN: HALD, authors' split (soft 75 / hard 150 / soft 75)|ConvNet-3 BN: HALD, soft 120 / hard 60 / soft 120"
	$(PY) tools/evidence.py --cifar $(CIFAR) --group ceiling --crops 300 --jobs 2

# Tiny-ImageNet (200 classes) at 32 px: TINY=unpacked root with train/ and val/ (../shared/data/tiny-imagenet/README.md);
# runs missing from results/tiny-imagenet/runs/ (about 25 min each, two at a time), then the table
TINY ?= /tmp/tiny
evidence-tiny: $(VENV)/installed
	$(PY) tools/evidence_tiny.py --tiny $(TINY) --jobs 2

# generator-made sets (sets/, made by tools/distill.py): HALD and soft-only on each, the runs missing from
# results/*/generated/ (CIFAR-10: about 10 min a run, Tiny-ImageNet at 32 px: about 50), two at a time
evidence-generated: $(VENV)/installed
	$(PY) tools/evidence_generated.py --cifar $(CIFAR) --tiny $(TINY) --jobs 2

# HALD's optimizer across the phase switch (--phase-switch keep, reset, t2) on the real draw and the generator-made
# CIFAR-10 sets, s = 10, 2, 1, 3 seeds, the runs missing from results/cifar10/switch/ (about 4 min each on one core,
# two at a time; about 2 h in all on 2 CPU cores), the mechanism check at batch 4, then the hard phase's length with the
# reset at s = 10, 4, 2 on the real draw (about 5 h) and at 10, 2 on the generator-made sets (about 1 h), and ResNet-18
# (about 35 min a run) and the instance-norm ConvNet-3 with the reset
evidence-switch: $(VENV)/installed
	$(PY) tools/evidence_switch.py --cifar $(CIFAR) --jobs 2
	$(PY) tools/evidence_switch.py --cifar $(CIFAR) --jobs 2 --sets real-b4 --crops 10 --treatments soft,keep,reset
	$(PY) tools/evidence_switch.py --cifar $(CIFAR) --jobs 2 --sets real --crops 10,4,2 --treatments soft,reset,reset-h30,reset-h15,reset-h5,reset-hard-first-15
	$(PY) tools/evidence_switch.py --cifar $(CIFAR) --jobs 2 --sets recover,select --crops 10,2 --treatments reset-h30,reset-h5
	$(PY) tools/evidence_switch.py --cifar $(CIFAR) --jobs 2 --sets real-r18,real-in --crops 10,2,1 --treatments reset

# the class-count axis: Tiny-ImageNet at 32 px, nested subsets of 10, 50 (and 200) classes, soft-only and HALD (the
# reset) at s = 1, 2, 10, 3 seeds, the ceilings, then HALD with AdamW's state kept (at 200 classes: s = 10), and at 10 classes HALD with hard
# phases of 30 and 5 epochs at s = 2, 4, 10; the gradient cosine of every setting (tools/alignment.py). 10 classes:
# about 2 min a run; 50: about 7; 200: about 25 (one core each)
evidence-classes: $(VENV)/installed
	$(PY) tools/evidence_classes.py --tiny $(TINY) --jobs 2 --ceiling
	$(PY) tools/evidence_classes.py --tiny $(TINY) --jobs 2 --schedules shs-keep --classes 10,50
	$(PY) tools/evidence_classes.py --tiny $(TINY) --jobs 2 --schedules soft,shs,shs-keep --classes 200 --crops 10
	$(PY) tools/evidence_classes.py --tiny $(TINY) --jobs 2 --classes 10 --crops 2,4,10 --schedules soft,shs,shs-h30,shs-h5
	$(PY) tools/alignment.py --tiny $(TINY)

# on one CUDA GPU (H100/H200): the paper's own Tiny-ImageNet setting, 64 px (ResNet-18 teacher, recover set of
# IPC 10, soft-only and HALD at 1 and 2 crops per image), one table in runs/paper-tiny/table.md; about 12 min
# (an estimate), with $(PYTHON) as gpu-check: a Python whose torch sees the GPU. On the lent GPU machine, where
# ../shared does not travel, see tools/paper_tiny.py's docstring.
TINY_TARS ?= ../shared/data/tiny-imagenet
paper-tiny:
	PYTHONUNBUFFERED=1 $(PYTHON) tools/paper_tiny.py --tiny-tars $(TINY_TARS) --out runs/paper-tiny

# the results tables (docs/results.md, RESULTS.md) from the committed per-run summaries (results/*/runs/): no data, nothing trained
tables: $(VENV)/installed
	$(PY) tools/evidence.py --table-only --group students --crops 1,2,10
	$(PY) tools/evidence.py --table-only --group ceiling --crops 300
	$(PY) tools/evidence.py --table-only --group more --only "soft-only, T 4|HALD, label smoothing 0.1, T 4|HALD, short hard phase (soft 120/hard 60/soft 120), T 4" --crops 1,2,10
	$(PY) tools/evidence.py --table-only --group suspects --only "hard-only, label smoothing 0.1" --crops 1
	$(PY) tools/evidence_tiny.py --table-only
	$(PY) tools/evidence_generated.py --table-only
	$(PY) tools/evidence_switch.py --table-only
	$(PY) tools/evidence_classes.py --table-only
	$(PY) tools/when_hald_helps.py

# the README's picture of when HALD helps (results/classes/gain.png) from the committed summaries; needs matplotlib
picture: $(VENV)/installed
	$(PY) -m pip install --quiet matplotlib
	$(PY) tools/evidence_classes.py --table-only --picture results/classes/gain.png

clean:
	rm -rf runs .pytest_cache .hypothesis __pycache__
