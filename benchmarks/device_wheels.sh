#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the lent GPU machine, whose image (Python 3.12, torch 2.11,
# transformers 5.17, accelerate, peft; no trl, no datasets) cannot download: downloaded here into .whl/ (about
# 15 MB, ignored by git), carried there with `carry=[".whl"]`. Versions are those this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
