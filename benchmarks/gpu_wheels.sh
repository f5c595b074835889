#!/usr/bin/env bash
# Run here (where PyPI is reachable) before a GPU session: downloads the Python 3.12 wheels that
# the tests and benchmarks need and the GPU machine (no package registry) may lack, into
# .gpu-wheels/ (git-ignored, about 42 MB). Pass it to the device run with carry=[".gpu-wheels"];
# gpu_check.sh installs from it, offline, whatever is missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary :all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .gpu-wheels safetensors tqdm pyyaml matplotlib pytest expecttest
du -sh .gpu-wheels
