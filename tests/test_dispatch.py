"""Runtime CPU dispatch and thread settings, through the environment variables a user would set
(each in a fresh interpreter, since they are read at import)."""
import os
import subprocess
import sys

import tempfile

import pytest

import glm4rt
from glm4rt import ops


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GLM4RT_", "OMP_", "GOMP_"))}
    full_env.update(env)
    # Run outside the source tree so `import glm4rt` finds the installed package.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                              text=True, timeout=120, cwd=cwd)


def test_best_isa_is_default():
    r = _run("import glm4rt; print(glm4rt.cpu_isa(), ','.join(glm4rt.supported_isas()))")
    assert r.returncode == 0, r.stderr
    active, supported = r.stdout.split()
    assert supported.split(",")[0] == "generic"
    assert active == supported.split(",")[-1]


@pytest.mark.parametrize("isa", glm4rt.supported_isas())
def test_env_forces_each_supported_isa(isa):
    r = _run("import glm4rt; print(glm4rt.cpu_isa())", GLM4RT_ISA=isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_env_with_unknown_isa_fails_import_with_message():
    r = _run("import glm4rt", GLM4RT_ISA="sse9")
    assert r.returncode != 0
    assert "GLM4RT_ISA=sse9" in r.stderr and "generic" in r.stderr
    assert "Traceback" in r.stderr  # a Python exception, not a crash


_DECODE_CODE = """
import hashlib, numpy as np, glm4rt
from glm4rt.quant import QuantLinear, quantize_weight
rng = np.random.default_rng(5)
w = rng.standard_normal((80, 4096)).astype(np.float32)  # 5 groups of 16 rows: pairs and a single
x = rng.standard_normal((1, 4096)).astype(np.float32)
h = hashlib.sha256()
for fmt in ("int8", "int4"):
    for n in (1, 2):
        glm4rt.set_num_threads(n)
        h.update(QuantLinear(quantize_weight(w, fmt), fmt, 80, 4096)(x).tobytes())
for k in (4096, 9000):  # bf16 GEMV: 1 or 4 rows at a time (CPU tuning), and 4 for K > 8192
    wb = glm4rt.ops.f32_to_bf16(rng.standard_normal((40, k)).astype(np.float32))
    xb = rng.standard_normal((1, k)).astype(np.float32)
    h.update(glm4rt.ops.linear(xb, wb).tobytes())
    with glm4rt.batch_invariant():  # the AVX512-BF16 dot tiles take one token's rows the same way
        h.update(glm4rt.ops.linear(xb, wb).tobytes())
print(h.hexdigest())
"""


# CPU tunings of the one-token GEMVs, chosen from CPUID; the GLM4RT_DEV_* variables override them
# for benchmarking (csrc/kernels.h, CpuTuning). Both settings of each must give the bits of the
# default:
#  GLM4RT_DEV_DECODE_PREFETCH: where the int8, int4 and bf16 GEMVs prefetch their weights;
#  GLM4RT_DEV_BF16_GEMV_ROWS: whether the bf16 GEMV (and batch-invariant mode's one-token dot
#  tiles) stream 1 or 4 rows at a time for K <= 8192 (every row is summed in the same order either way).
# All are read when the module is imported, so a bad value fails the import on every CPU, also
# where no kernel uses the setting (an AVX2-only CPU).
@pytest.mark.parametrize("var, values, bad", [
    ("GLM4RT_DEV_DECODE_PREFETCH", ("l1", "l2"), "l3"),
    ("GLM4RT_DEV_BF16_GEMV_ROWS", ("1", "4"), "2"),
])
def test_decode_tuning_changes_no_bits(var, values, bad):
    runs = {v: _run(_DECODE_CODE, **({var: v} if v else {})) for v in ("",) + values}
    for v, r in runs.items():
        assert r.returncode == 0, (v, r.stderr)
    assert len({r.stdout for r in runs.values()}) == 1
    bad_run = _run("import glm4rt", **{var: bad})
    assert bad_run.returncode != 0
    assert f"{var} must be {values[0]} or {values[1]}, got '{bad}'" in bad_run.stderr
    assert "Traceback" in bad_run.stderr


def test_unknown_dev_setting_fails_import():
    # A misspelt override must not let a benchmark measure the default unawares.
    r = _run("import glm4rt", GLM4RT_DEV_DECODE_PREFECTH="l1")
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert "unknown developer setting GLM4RT_DEV_DECODE_PREFECTH" in r.stderr
    assert "GLM4RT_DEV_DECODE_PREFETCH" in r.stderr


def test_env_sets_threads():
    r = _run("import glm4rt; print(glm4rt.get_num_threads())", GLM4RT_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"


def test_set_isa_and_threads_from_python():
    before_threads = glm4rt.get_num_threads()
    try:
        glm4rt.set_num_threads(1)
        assert glm4rt.get_num_threads() == 1
        for isa in glm4rt.supported_isas():
            glm4rt.set_isa(isa)
            assert glm4rt.cpu_isa() == isa
        glm4rt.set_isa("auto")
        assert glm4rt.cpu_isa() == glm4rt.supported_isas()[-1]
        with pytest.raises(ValueError, match="threads"):
            glm4rt.set_num_threads(0)
        with pytest.raises(ValueError, match="not available"):  # the other architecture's
            glm4rt.set_isa("avx2" if "neon" in glm4rt.supported_isas() else "neon")
    finally:
        glm4rt.set_num_threads(before_threads)


def _loaded_libraries() -> str:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif("libgomp" not in _loaded_libraries(),
                    reason="GOMP_SPINCOUNT is libgomp's (GCC builds); this build links another OpenMP runtime "
                           "(Clang's libomp: tools/compile_check.sh clang)")
def test_openmp_threads_spin_briefly_unless_the_user_chose():
    # libgomp reads its wait policy once, when _C loads it (OMP_DISPLAY_ENV prints what it read):
    # glm4rt sets a short spin for that moment only, and never overrides the user's choice.
    code = "import os, glm4rt; print('leaked' if 'GOMP_SPINCOUNT' in os.environ else 'clean')"
    ours = _run(code, OMP_DISPLAY_ENV="verbose")
    assert ours.returncode == 0, ours.stderr
    assert "GOMP_SPINCOUNT = '1000'" in ours.stderr and ours.stdout.strip() == "clean"
    for var, value, shown in [("OMP_WAIT_POLICY", "active", "OMP_WAIT_POLICY = 'ACTIVE'"),
                              ("GOMP_SPINCOUNT", "5", "GOMP_SPINCOUNT = '5'")]:
        theirs = _run("import os, glm4rt; print(os.environ['%s'])" % var, OMP_DISPLAY_ENV="verbose", **{var: value})
        assert theirs.returncode == 0, theirs.stderr
        assert shown in theirs.stderr and theirs.stdout.strip() == value


# ---- the OS checks: what CPUID and XCR0 allow (csrc/dispatch.cpp, x86_features) -----------------

# A CPU with every x86 feature the kernel sets use (a Sapphire Rapids class Xeon), bit by bit from
# Intel's SDM: CPUID.1:ECX OSXSAVE 27, FMA 12, F16C 29; CPUID.7.0:EBX AVX2 5, AVX512F 16, DQ 17,
# BW 30, VL 31; ECX AVX512_VNNI 11; EDX AMX_BF16 22, AMX_TILE 24; CPUID.7.1:EAX AVX_VNNI 4,
# AVX512_BF16 5. XCR0: x87 0, SSE 1, AVX 2, opmask 5, ZMM_Hi256 6, Hi16_ZMM 7, XTILECFG 17,
# XTILEDATA 18.
FULL = dict(leaf1_ecx=(1 << 27) | (1 << 12) | (1 << 29),
            leaf7_ebx=(1 << 5) | (1 << 16) | (1 << 17) | (1 << 30) | (1 << 31),
            leaf7_ecx=1 << 11, leaf7_edx=(1 << 22) | (1 << 24), leaf7_1_eax=(1 << 4) | (1 << 5),
            xcr0=0b111 | (0b111 << 5) | (0b11 << 17))
x86_only = pytest.mark.skipif("neon" in glm4rt.supported_isas(), reason="x86 kernel sets: not in an ARM64 build")


def _isas(amx_granted=True, **changes):
    return ops._C.x86_isas_for(**{**FULL, **changes}, amx_granted=amx_granted)


@x86_only
def test_the_sets_of_this_cpu_follow_from_its_cpuid_and_xcr0():
    regs = ops._C.x86_cpuid()
    assert ops._C.x86_isas_for(**regs, amx_granted="amx" in glm4rt.supported_isas()) == glm4rt.supported_isas()


@x86_only
def test_every_feature_and_state_gives_every_set():
    isas = _isas()
    assert isas[:5] == ["generic", "avx2", "avx_vnni", "avx512", "avx512_bf16"]
    assert isas[5:] in ([], ["amx"])  # amx where this build has its kernels (Linux, GCC 11 / Clang 12)


@x86_only
def test_an_os_that_does_not_save_avx512_state_gets_no_avx512_set():
    # The CPU has AVX-512, but the OS does not save opmask / ZMM registers (XCR0 bits 5-7 clear):
    # AVX-512 instructions would fault, so no set that uses them is offered.
    for missing in (1 << 5, 1 << 6, 1 << 7):
        isas = _isas(xcr0=FULL["xcr0"] & ~missing)
        assert not {"avx512", "avx512_bf16", "amx"} & set(isas), hex(missing)
        assert isas[:2] == ["generic", "avx2"] and isas[2:] in ([], ["avx_vnni"])  # VEX VNNI, if built
    assert _isas(xcr0=FULL["xcr0"] & ~0xE0, leaf7_1_eax=1 << 5) == ["generic", "avx2"]  # no AVX-VNNI either


@x86_only
def test_an_os_that_does_not_save_ymm_state_gets_only_generic():
    assert _isas(xcr0=0b011) == ["generic"]
    assert _isas(leaf1_ecx=FULL["leaf1_ecx"] & ~(1 << 27)) == ["generic"]  # no OSXSAVE: no XGETBV


@x86_only
def test_amx_needs_the_tile_state_and_the_permission():
    assert "amx" not in _isas(xcr0=FULL["xcr0"] & ~(1 << 18))
    assert "amx" not in _isas(xcr0=FULL["xcr0"] & ~(1 << 17))
    assert "amx" not in _isas(amx_granted=False)  # Linux refused the tile data permission
    assert _isas(amx_granted=False)[-1] == "avx512_bf16"


@x86_only
def test_avx512_without_vnni_runs_the_avx2_sets():
    # Skylake-X: AVX-512 F/BW/VL/DQ but no VNNI; the avx512 kernels need VNNI.
    assert _isas(leaf7_ecx=0, leaf7_1_eax=0) == ["generic", "avx2"]
