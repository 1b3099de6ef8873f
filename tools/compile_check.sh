#!/usr/bin/env bash
# The C++ sources under other compilers and for other systems (issue 22): what can be proved on a
# Debian x86-64 machine without macOS's SDK or MSVC.
#
#   tools/compile_check.sh            # all checks below (~4 min on 2 cores)
#   tools/compile_check.sh clang      # one of: clang | mingw | clang-arm64
#
# - clang:       the whole extension built with Clang (the compiler of macOS, and of clang-cl) on
#                x86-64 Linux, with Clang's OpenMP (libomp), then the kernel and quantization
#                tests run against that module (every ISA this CPU has).
# - mingw:       every C++ source but the Python bindings (GLM4RT_PYTHON=OFF: there are no Windows
#                Python headers here) compiled by MinGW-w64 for Windows x86-64 with every ISA file
#                and OpenMP, and a small program linked against it (Windows API, no POSIX).
# - clang-arm64: the same library for ARM64 Linux by Clang (the NEON, dotprod and i8mm files with
#                their -march flags), with the arm64 sysroot of tools/arm64_emulate.sh setup.
# Not provable here: MSVC itself (the _MSC_VER branches: __cpuidex / _xgetbv, _mm_prefetch, the
# VNNI broadcast intrinsic, /arch flags) and the macOS SDK's headers (sysctlbyname,
# _NSGetEnviron): Clang cannot compile for those targets against Linux's C library headers.
# Packages: clang, libomp-dev, g++-mingw-w64-x86-64 (apt).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/glm4rt-compile-check}
ARM64_ROOT=${GLM4RT_ARM64_CACHE:-$HOME/.cache/glm4rt-arm64}/sysroot
mkdir -p "$OUT"

# Build; fail on any error, or on a warning at a line of our sources (GCC 12's false positives
# inside its own intrinsic headers, e.g. '__Y' may be used uninitialized, are not ours).
build_quietly() {
  local log=$1.log
  cmake --build "$1" -j "$(nproc)" >"$log" 2>&1 || { grep -E "error" "$log" | head -20; return 1; }
  if grep -E "^$REPO/[^:]+:[0-9]+:[0-9]+: warning" "$log"; then return 1; fi
}

check_clang() {
  echo "== clang: the extension built by $(clang++ --version | head -1)"
  local build=$OUT/clang pkg=$OUT/clang-pkg
  rm -rf "$build"
  CC=clang CXX=clang++ cmake -S "$REPO" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" \
    >/dev/null
  build_quietly "$build" || return 1
  rm -rf "$pkg" && mkdir -p "$pkg" && cp -r "$REPO/glm4rt" "$pkg/" && rm -f "$pkg"/glm4rt/_C*.so
  cp "$build"/_C.*.so "$pkg/glm4rt/"
  # A venv that sees this Python's packages (a plain path in a .pth: their own .pth files, such as
  # an editable glm4rt's import hook, are not run) and finds glm4rt in $pkg first.
  rm -rf "$OUT/venv" && python -m venv --without-pip "$OUT/venv"
  python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$(echo "$OUT"/venv/lib/python3*/site-packages)/host.pth"
  local py=$OUT/venv/bin/python
  (cd "$OUT" && PYTHONPATH=$pkg $py -c "import glm4rt, glm4rt._C as c; assert c.__file__.startswith('$pkg'), c.__file__; print('clang-built module', c.__file__, glm4rt.supported_isas())"
   PYTHONPATH=$pkg $py -m pytest -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" -q \
     "$REPO/tests/test_kernels.py" "$REPO/tests/test_quant.py" "$REPO/tests/test_q4k.py" "$REPO/tests/test_dispatch.py")
}

check_mingw() {
  echo "== mingw: the C++ sources for Windows x86-64 by $(x86_64-w64-mingw32-g++ --version | head -1)"
  local build=$OUT/mingw
  rm -rf "$build"
  cat > "$OUT/mingw.cmake" <<'EOF'
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR AMD64)
set(CMAKE_C_COMPILER x86_64-w64-mingw32-gcc)
set(CMAKE_CXX_COMPILER x86_64-w64-mingw32-g++)
EOF
  cmake -S "$REPO" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$OUT/mingw.cmake" -DCMAKE_BUILD_TYPE=Release \
    -DGLM4RT_PYTHON=OFF >/dev/null
  build_quietly "$build" || return 1
  cat > "$OUT/main.cpp" <<'EOF'
#include <cstdio>
#include "dispatch.h"
int main() {
  for (const auto& isa : glm4rt::supported_isas()) std::printf("%s\n", isa.c_str());
}
EOF
  x86_64-w64-mingw32-g++ -std=c++17 -O2 -fopenmp -I "$REPO/csrc" "$OUT/main.cpp" "$build/libglm4rt_kernels.a" \
    -static -o "$OUT/glm4rt_isas.exe"
  file "$OUT/glm4rt_isas.exe"
}

check_clang_arm64() {
  echo "== clang-arm64: the C++ sources for ARM64 Linux by $(clang++ --version | head -1)"
  [[ -d $ARM64_ROOT/usr/include ]] || { echo "no arm64 sysroot: run tools/arm64_emulate.sh setup" >&2; return 1; }
  local build=$OUT/clang-arm64
  rm -rf "$build"
  cat > "$OUT/clang-arm64.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER clang)
set(CMAKE_CXX_COMPILER clang++)
set(CMAKE_C_COMPILER_TARGET aarch64-linux-gnu)
set(CMAKE_CXX_COMPILER_TARGET aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH $ARM64_ROOT)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
EOF
  # The C and C++ library headers of Debian's aarch64 cross toolchain. OpenMP: Clang's own
  # (omp.h of its resource directory; a static library links no runtime, the name is a formality).
  cmake -S "$REPO" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$OUT/clang-arm64.cmake" -DCMAKE_BUILD_TYPE=Release \
    -DGLM4RT_PYTHON=OFF -DOpenMP_CXX_FLAGS=-fopenmp -DOpenMP_CXX_LIB_NAMES=gomp \
    -DOpenMP_gomp_LIBRARY=/usr/lib/gcc-cross/aarch64-linux-gnu/12/libgomp.so \
    -DCMAKE_CXX_FLAGS="--gcc-toolchain=/usr -isystem /usr/aarch64-linux-gnu/include" >/dev/null
  build_quietly "$build" || return 1
  file "$build/libglm4rt_kernels.a" | head -1
  llvm-objdump-14 -d --mattr=+dotprod,+i8mm "$build"/CMakeFiles/glm4rt_kernels.dir/csrc/kernels/arm_i8mm.cpp.o | grep -c smmla | sed 's/^/smmla instructions in arm_i8mm.o: /'
  llvm-objdump-14 -d --mattr=+dotprod,+i8mm "$build"/CMakeFiles/glm4rt_kernels.dir/csrc/kernels/arm_dotprod.cpp.o | grep -c sdot | sed 's/^/sdot instructions in arm_dotprod.o: /'
  llvm-objdump-14 -d --mattr=+bf16 "$build"/CMakeFiles/glm4rt_kernels.dir/csrc/kernels/arm_bf16.cpp.o | grep -c bfdot | sed "s/^/bfdot instructions in arm_bf16.o: /"
}

status=0
for check in ${1:-clang mingw clang-arm64}; do
  "check_${check//-/_}" || { echo "FAILED: $check" >&2; status=1; }
done
exit $status
