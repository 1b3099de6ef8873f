#!/usr/bin/env bash
# glm4rt on ARM64 without ARM hardware (issue 22): cross-compile the extension with Debian's aarch64
# toolchain and run Python code or the tests in an arm64 Python under qemu-user.
#
#   tools/arm64_emulate.sh setup                  # once: toolchain, arm64 Python + NumPy, wheels (~2 min)
#   tools/arm64_emulate.sh build                  # cross-compile glm4rt's extension for aarch64
#   tools/arm64_emulate.sh pytest tests/test_golden.py -q    # pytest under qemu-aarch64
#   tools/arm64_emulate.sh python -c "import glm4rt; print(glm4rt.supported_isas())"
#
# Debian 12 (bookworm) on x86-64. What it does:
# - apt: g++-aarch64-linux-gnu and qemu-user; `dpkg --add-architecture arm64` so that apt can fetch
#   arm64 packages. The arm64 Python is NOT installed into the system: python3.11-minimal:arm64
#   would replace the host's /usr/bin/python3.11 with an ARM binary (it is not co-installable), and
#   apt's own hooks then fail. Instead `apt-get download` fetches the arm64 .debs of Python 3.11,
#   NumPy and the libraries they load, and `dpkg -x` unpacks them into a sysroot ($ROOT), which
#   qemu-aarch64 -L uses as the arm64 file system (with the libblas / liblapack links that Debian's
#   alternatives would make).
# - pip: glm4rt's dependencies as aarch64 wheels from the package index (`pip install --target
#   --platform manylinux..._aarch64 --only-binary=:all:`) into $SITE.
# - CMake with an aarch64 toolchain file, pybind11's headers from the host, Python's from the
#   sysroot; the module goes into a copy of the glm4rt package at $PKG.
# Environment: GLM4RT_ARM64_CACHE (default ~/.cache/glm4rt-arm64).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${GLM4RT_ARM64_CACHE:-$HOME/.cache/glm4rt-arm64}
ROOT=$CACHE/sysroot SITE=$CACHE/site PKG=$CACHE/pkg BUILD=$CACHE/build
PY_DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 libpython3.11 libpython3.11-dev
  python3-numpy libc6 libexpat1 zlib1g libssl3 libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6
  libreadline8 libuuid1 libdb5.3 libgdbm6 libnsl2 libtirpc3 libcrypt1 libblas3 liblapack3 libgfortran5 libgcc-s1
  libstdc++6 libgomp1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1"
WHEELS=("safetensors>=0.4" "tokenizers>=0.19" "jinja2>=3.1" "tqdm>=4.60" "huggingface_hub>=0.23" "gguf>=0.17"
        pytest pytest-timeout)

setup() {
  command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || {
    dpkg --add-architecture arm64
    apt-get update -qq
    apt-get install -y -qq g++-aarch64-linux-gnu qemu-user
  }
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
  mkdir -p "$CACHE/debs" "$ROOT"
  (cd "$CACHE/debs" && for p in $PY_DEBS; do ls "${p}"_*_arm64.deb >/dev/null 2>&1 || apt-get download -qq "$p:arm64"; done
   ls media-types_*.deb >/dev/null 2>&1 || apt-get download -qq media-types)
  for f in "$CACHE"/debs/*.deb; do dpkg -x "$f" "$ROOT"; done
  ln -sf blas/libblas.so.3 "$ROOT/usr/lib/aarch64-linux-gnu/libblas.so.3"
  ln -sf lapack/liblapack.so.3 "$ROOT/usr/lib/aarch64-linux-gnu/liblapack.so.3"
  python -m pip install -q --target "$SITE" --upgrade --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp \
    --only-binary=:all: "${WHEELS[@]}"
  run_python -c "import sys, numpy, tokenizers; print('arm64 Python', sys.version.split()[0], 'NumPy', numpy.__version__)"
}

build() {
  mkdir -p "$BUILD"
  cat > "$BUILD/toolchain.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH $ROOT)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
EOF
  # Python's headers from the sysroot (its pyconfig.h includes the multiarch aarch64 one); the
  # interpreter CMake runs is the host's (the same 3.11 ABI), which names the module x86_64.
  cmake -S "$REPO" -B "$BUILD/cmake" -DCMAKE_TOOLCHAIN_FILE="$BUILD/toolchain.cmake" -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" \
    -DPython_INCLUDE_DIR="$ROOT/usr/include/python3.11" -DCMAKE_CXX_FLAGS="-isystem $ROOT/usr/include" >/dev/null
  cmake --build "$BUILD/cmake" -j "$(nproc)"
  rm -rf "$PKG" && mkdir -p "$PKG"
  cp -r "$REPO/glm4rt" "$PKG/"
  rm -f "$PKG"/glm4rt/_C*.so
  cp "$BUILD"/cmake/_C.*.so "$PKG/glm4rt/_C.cpython-311-aarch64-linux-gnu.so"
  file "$PKG/glm4rt/_C.cpython-311-aarch64-linux-gnu.so" | grep -q "ARM aarch64" || { echo "not an aarch64 module" >&2; exit 1; }
  run_python -c "import glm4rt, platform; print('glm4rt on', platform.machine(), 'ISAs', glm4rt.supported_isas())"
}

# The arm64 interpreter behind wrappers: qemu-user does not follow execve, so a program the emulated
# Python starts would run natively; the tests start `sys.executable` and the `glm4rt` console
# script, which are these wrappers (qemu's -0 sets argv[0], from which Python takes
# sys.executable), first on PATH. From outside the source tree: there `import glm4rt` would find
# the sources, which have no aarch64 module.
wrappers() {
  mkdir -p "$CACHE/bin"
  printf '#!/bin/sh\nexec qemu-aarch64 -L "%s" -0 "%s" "%s" "$@"\n' "$ROOT" "$CACHE/bin/python" \
    "$ROOT/usr/bin/python3.11" > "$CACHE/bin/python"
  printf '#!/bin/sh\nexec "%s" -m glm4rt "$@"\n' "$CACHE/bin/python" > "$CACHE/bin/glm4rt"
  chmod +x "$CACHE/bin/python" "$CACHE/bin/glm4rt"
  ln -sf python "$CACHE/bin/python3"
}

run_python() {
  wrappers
  (cd "$CACHE" && env PYTHONPATH="$PKG:$SITE" PATH="$CACHE/bin:$PATH" "$CACHE/bin/python" "$@")
}

# Test paths are taken relative to the repository.
run_pytest() {
  local args=()
  for a in "$@"; do [[ $a == tests* ]] && args+=("$REPO/$a") || args+=("$a"); done
  run_python -m pytest -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" "${args[@]}"
}

case "${1:-}" in
  setup) setup ;;
  build) build ;;
  python) shift; run_python "$@" ;;
  pytest) shift; run_pytest "$@" ;;
  *) echo "usage: $0 setup | build | python ARGS | pytest ARGS" >&2; exit 2 ;;
esac
