#!/usr/bin/env bash
# Download the wheels of bench/lease-wheels.txt into .whl/ (ignored by git), for the device
# machine's Python 3.12 on x86-64. Run here, where pip can reach a registry; the lent machine cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' bench/lease-wheels.txt | grep . | while read -r requirement; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$requirement"
done
ls -l .whl
