"""The source distribution and setup.py's refusals, run on a copy of the tree's tracked files.

An sdist is what PyPI users (and `python -m build`) compile from: it must hold every header and CUDA source,
whatever machine packed it, and packing it must not need torch (an isolated build environment has none).
"""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs setup.py with `import torch` failing, as in pip's isolated build environment.
WITHOUT_TORCH = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py'] + sys.argv[1:]; " \
                "runpy.run_path('setup.py', run_name='__main__')"


def tracked_files():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs the git checkout of the package (its tracked files are the expected contents)")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return [name for name in listing.decode().split("\0") if name]


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory):
    """The tracked files only, so no build output of the working tree can leak into what is checked."""
    dest = tmp_path_factory.mktemp("tree")
    for name in tracked_files():
        os.makedirs(dest / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), dest / name)
    return dest


def run_setup(tree, *args, without_torch=True, prelude=""):
    code = prelude + (WITHOUT_TORCH if without_torch else "import runpy, sys; sys.argv = ['setup.py'] + "
                      "sys.argv[1:]; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "GMAMBA_CUDA": "0"}, timeout=300)


def test_sdist_packs_without_torch_and_holds_every_source(tree_copy, tmp_path):
    # A stale build-info file and a compiled module in the tree must stay out of the sdist.
    (tree_copy / "gmamba_ext" / "_build_info.py").write_text("BACKENDS = ('cpu', 'cuda')\n")
    (tree_copy / "gmamba_ext" / "_C.fake.so").write_bytes(b"\0")
    result = run_setup(tree_copy, "-q", "sdist", "-d", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = list(tmp_path.glob("gmamba_ext-*.tar.gz"))
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        packed = {name[len(top) + 1:] for name in tar.getnames() if name.startswith(top + "/")}
    needed = [name for name in tracked_files()
              if name.startswith(("csrc/", "gmamba_ext/", "docs/"))
              or name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md", "MANIFEST.in")]
    assert any(name.endswith(".cuh") for name in needed) and any(name.endswith(".h") for name in needed)
    missing = sorted(set(needed) - packed)
    assert not missing, f"the sdist lacks {missing}"
    assert "gmamba_ext/_build_info.py" not in packed
    assert not [name for name in packed if name.endswith(".so")]


def test_compiling_without_torch_says_what_to_run(tree_copy):
    result = run_setup(tree_copy, "bdist_wheel")
    assert result.returncode == 1
    assert "PyTorch is not importable" in result.stderr and "--no-build-isolation" in result.stderr


def test_old_setuptools_is_named_with_the_fix(tree_copy):
    # pyproject's SPDX license string needs setuptools >= 77; an older one gets told how to upgrade.
    prelude = "import setuptools; setuptools.__version__ = '65.5.0'; "
    result = run_setup(tree_copy, "-q", "sdist", without_torch=False, prelude=prelude)
    assert result.returncode == 1
    assert "setuptools >= 77 is needed" in result.stderr and "65.5.0" in result.stderr
