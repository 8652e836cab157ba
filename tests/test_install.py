"""The packages import, the native op library is the one this checkout built, and set-up compiles it once."""
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools
import torch

import detector
import e2e_vl
from detector import _ext


def test_packages_import():
    assert detector.__version__ and e2e_vl.__version__


def test_native_ops_loaded():
    assert _ext.LOADED, _ext._WHY
    assert hasattr(torch.ops.detector, "_cuda_version")


def test_cuda_sources_compiled_when_toolkit_present():
    # Where nvcc and a CUDA torch exist (this machine and CI, even without a GPU), setup.py compiles
    # the CUDA kernels too, and the library must say so.
    if shutil.which("nvcc") and torch.version.cuda:
        assert _ext.cuda_version() > 0
    else:
        assert _ext.cuda_version() == -1


def test_missing_library_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "LOADED", False)
    monkeypatch.setattr(_ext, "_WHY", _ext.BUILD_HELP)
    try:
        _ext.require()
    except _ext.NativeOpMissing as exc:
        assert "make build" in str(exc)
    else:
        raise AssertionError("require() did not raise")


REPO = Path(__file__).resolve().parents[1]


def _make_dry_run(target: str, venv: Path, stamp: Path) -> list[str]:
    """The commands `make -n target` would run with this .venv and native-op stamp (nothing is run)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # not the flags of the `make test` this may run under
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    r = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={venv}", f"NATIVE_OP={stamp}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    return [ln for ln in r.stdout.splitlines() if not ln.startswith("make:")]  # not "Nothing to be done"


def _compiles(lines: list[str]) -> list[str]:
    """The commands that compile the native op: build_ext, or a pip install of the package that builds it."""
    return [ln for ln in lines if "build_ext" in ln
            or ("pip install -e" in ln and "E2E_VL_SKIP_NATIVE_OP=1" not in ln)]


def test_fresh_set_up_compiles_the_native_op_once(tmp_path):
    lines = _make_dry_run("test", tmp_path / "venv", tmp_path / "native-op.stamp")
    assert any("pip install -e" in ln for ln in lines), lines  # the packages are installed
    assert len(_compiles(lines)) == 1, lines


def test_native_op_recompiled_only_when_its_sources_changed(tmp_path):
    if not list((REPO / "detector").glob("_C*.so")):
        pytest.skip("the native op is not built here")
    venv, stamp = tmp_path / "venv", tmp_path / "native-op.stamp"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".e2e-vl-installed").touch()
    stamp.touch()  # compiled after every source was written
    assert _make_dry_run("build", venv, stamp) == []
    os.utime(stamp, (0, 0))  # now every source and header is newer than the compiled op
    lines = _make_dry_run("build", venv, stamp)
    assert len(_compiles(lines)) == 1 and not any("pip" in ln for ln in lines), lines


def test_setup_py_leaves_the_native_op_to_make_when_asked(monkeypatch):
    declared = []
    monkeypatch.setattr(setuptools, "setup", lambda **kw: declared.append(kw["ext_modules"]))
    monkeypatch.setenv("FORCE_CPU", "1")
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/nonexistent"))  # setup.py may set it
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("E2E_VL_SKIP_NATIVE_OP", raising=False)
    runpy.run_path(str(REPO / "setup.py"))
    monkeypatch.setenv("E2E_VL_SKIP_NATIVE_OP", "1")
    runpy.run_path(str(REPO / "setup.py"))
    assert [m.name for m in declared[0]] == ["detector._C"] and declared[1] == []
