import glob
import os
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(TESTS, "fixtures")
ROOT = os.path.dirname(TESTS)


def _unshadow_installed_package() -> None:
    """``python -m pytest`` puts the working directory on sys.path, so from the source tree
    ``import glm4rt`` finds the sources, which have no compiled ``glm4rt._C`` unless it was built
    in place: drop the source tree from sys.path and the installed package is imported instead (an
    editable install's import hook maps ``glm4rt`` back to these sources, with its ``_C``)."""
    if glob.glob(os.path.join(ROOT, "glm4rt", "_C.*")):
        return
    root = os.path.realpath(ROOT)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


_unshadow_installed_package()
sys.path.insert(0, TESTS)  # golden_checks, hf_reference


# The x86 kernel sets, oldest first (csrc/dispatch.cpp); the header names those this CPU lacks.
X86_ISAS = ("generic", "avx2", "avx_vnni", "avx512", "avx512_bf16", "amx")


def pytest_report_header(config):
    """Which kernel paths this run covers: the tests parametrized by ISA run every ISA this CPU
    supports; all the others run the default kernels (the best one, or GLM4RT_ISA)."""
    import glm4rt
    from glm4rt import ops

    supported = glm4rt.supported_isas()
    missing = [isa for isa in X86_ISAS if isa not in supported]
    forced = os.environ.get("GLM4RT_ISA")
    threads = "default, follows the load" if ops.num_threads_is_default() else "GLM4RT_NUM_THREADS"
    return [f"glm4rt: ISA-parametrized tests run {', '.join(supported)}"
            + (f"; not covered (this CPU lacks them): {', '.join(missing)}" if missing else ""),
            f"glm4rt: other tests run the {glm4rt.cpu_isa()} kernels"
            + (f" (GLM4RT_ISA={forced})" if forced else " (the best this CPU has)"),
            f"glm4rt: threads {glm4rt.get_num_threads()} ({threads}), at most {ops.max_num_threads()}"]


@pytest.fixture(autouse=True)
def _restore_isa_and_threads():
    """Tests that force an ISA or a thread count must not leak it into the next test (a thread
    count restored as a number would no longer be the load-following default)."""
    import glm4rt
    from glm4rt import ops

    isa, default_threads, threads = glm4rt.cpu_isa(), ops.num_threads_is_default(), glm4rt.get_num_threads()
    yield
    glm4rt.set_isa(isa)
    glm4rt.set_num_threads(None if default_threads else threads)


def fixture_dir(name: str) -> str:
    return os.path.join(FIXTURES, name)


def golden(name: str):
    return np.load(os.path.join(FIXTURES, name, "golden.npz"))
