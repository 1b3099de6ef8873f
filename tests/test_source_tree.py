"""``python -m pytest`` from the source tree tests the installed package, whatever the install."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import glm4rt
from conftest import ROOT


def test_python_m_pytest_from_the_source_tree_with_a_regular_install(tmp_path):
    # `python -m` puts the working directory first on sys.path; from the source tree, whose glm4rt/
    # has no compiled _C, that used to fail with "cannot import name '_C'". A regular (not
    # editable) install is made here by copying the package and its _C next to each other, and
    # `python -S` keeps the real editable install's import hook (a .pth file) out of the way.
    if glob.glob(os.path.join(ROOT, "glm4rt", "_C.*")):
        pytest.skip("_C is built in place: the source tree is importable as it is")
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "glm4rt"), site / "glm4rt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(glm4rt.ops._C.__file__, site / "glm4rt")
    # A wheel repaired by auditwheel loads its own copy of libgomp from glm4rt.libs/ beside the
    # package (_C's RPATH is $ORIGIN/../glm4rt.libs).
    libs = os.path.join(os.path.dirname(os.path.dirname(glm4rt.ops._C.__file__)), "glm4rt.libs")
    if os.path.isdir(libs):
        shutil.copytree(libs, site / "glm4rt.libs")
    check = "tests/test_source_tree.py::test_the_imported_glm4rt_has_its_kernels"
    paths = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {**os.environ, "PYTHONPATH": paths}
    r = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", check],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout and f"glm4rt from {site / 'glm4rt'}" in r.stdout


def test_the_imported_glm4rt_has_its_kernels():
    print(f"glm4rt from {os.path.dirname(glm4rt.__file__)}")
    assert glm4rt.cpu_isa() in glm4rt.supported_isas()
