"""The packages import and the native op library is the one this checkout built."""
import shutil

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
