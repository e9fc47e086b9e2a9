#!/usr/bin/env bash
# Configure, build and run the C++ tests (CMakeLists.txt) against the torch of the active Python.
# Usage: bash tests/cpp/run_ctest.sh [build dir, default build/cmake]. Needs cmake >= 3.18; uses
# Ninja when available. Honours MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
build_dir=${1:-build/cmake}
python=$(command -v python || command -v python3)
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$python"
cmake --build "$build_dir" -j "${MAX_JOBS:-2}"
ctest --test-dir "$build_dir" --output-on-failure
