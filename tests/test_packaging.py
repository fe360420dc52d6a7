"""The source distribution builds the extension on its own, wherever it is unpacked.

setuptools puts into an sdist only the sources that setup.py lists on the machine that makes it:
no headers, and no CUDA files when that machine's torch has no CUDA. Without MANIFEST.in, an sdist
made here failed to compile anywhere (psft_checks.h: No such file or directory)."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
# What setup.py, pyproject.toml and MANIFEST.in read.
COPIED = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt", "csrc",
          "psft_ext", "tests", "examples")


def _native_sources():
    found = set()
    for folder, _, files in os.walk(os.path.join(REPO, "csrc")):
        for name in files:
            if name.endswith(NATIVE_SUFFIXES):
                found.add(os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/"))
    return found


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "setup.py")),
                    reason="not a source checkout")
def test_sdist_holds_every_native_source(tmp_path):
    # Made from a copy of the tree: sdist assembles its folder in the working directory, which
    # an interrupted or concurrent run would leave in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info", "build", "dist")
    for name in COPIED:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        elif os.path.exists(path):
            os.makedirs(src, exist_ok=True)
            shutil.copy2(path, src / name)
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        # Members are "psft_ext-<version>/<path>".
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = _native_sources()
    assert {"csrc/psft_checks.h", "csrc/cuda/psft_forward.cu"} <= sources  # the walk found them
    wanted = sources | {"setup.py", "pyproject.toml", "CMakeLists.txt", "psft_ext/__init__.py",
                        "psft_ext/linear/__init__.py", "psft_ext/linear/ops.py"}
    missing = sorted(wanted - members)
    assert not missing, f"missing from the sdist: {missing}"
    assert not [m for m in members if m.endswith((".so", ".o"))], "build outputs in the sdist"
