"""The sdist is complete: it builds and installs the C++ extension on its own, outside the
source tree; the version is one number everywhere; `seekr --version` tells what is built.

The install test builds from the sdist alone (unpacked by pip in a temporary folder) into a
fresh virtual environment. Only already-installed third-party packages are borrowed from
the environment running the tests (torch alone is GBs): a .pth line puts its site-packages
*after* the fresh one, and .pth files there (such as the editable install of this checkout)
are not processed, so `seekr_kernels` can only come from the sdist. --no-build-isolation
reuses the build tools (setuptools, pybind11, cmake, ninja) already there instead of
fetching them; no network is used. SEEKR_BUILD_CUDA=0: the CUDA extension takes minutes of
nvcc and is not what this test is about (scripts/setup.sh builds and tests it); the C++
extension is built from the sdist's CMakeLists.txt, csrc/ and python/ as any user would.
"""
import fcntl
import os
import re
import site
import subprocess
import sys
import tarfile
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _source_files(folder):
    out = []
    for d, dirs, files in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files
                if not f.endswith((".so", ".o", ".pyc"))]
    return sorted(out)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    # One build per test session, also across xdist workers: setuptools stages the sdist's
    # tree inside the source folder, so two builds at once would trample each other.
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "seekr-sdist"
    out.mkdir(exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = out / "built"
        if not built.exists():
            # What `python -m build --sdist --no-isolation` does: the PEP 517 hook of the
            # backend named in pyproject.toml (the `build` frontend is not a dependency).
            code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
            name = _run([sys.executable, "-c", code, str(out)], cwd=ROOT).stdout.strip().splitlines()[-1]
            built.write_text(name)
        return out / built.read_text()


def test_sdist_carries_the_build_inputs(sdist):
    version = metadata.version("seekr-kernels")
    assert sdist.name == f"seekr_kernels-{version}.tar.gz"
    with tarfile.open(sdist) as tf:
        top = f"seekr_kernels-{version}/"
        names = {n[len(top):] for n in tf.getnames() if n.startswith(top)}
    need = ["CMakeLists.txt", "README.md", "pyproject.toml", "setup.py", "seekr_kernels/_version.py"]
    need += _source_files("csrc") + _source_files("python")
    need += [f for f in _source_files("seekr_kernels") if f.endswith(".py")]
    missing = [n for n in need if n not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "build artefacts in the sdist"
    assert not [n for n in names if n.startswith("tests/")], "a partial test suite in the sdist"


def test_sdist_installs_in_a_fresh_venv_and_imports_the_extension(sdist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    fresh_site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    borrowed = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(fresh_site, "_borrowed_from_test_env.pth"), "w") as f:
        f.write("\n".join(borrowed) + "\n")

    env = dict(os.environ, SEEKR_BUILD_CUDA="0", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(min(os.cpu_count() or 1, 4)))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-build-isolation",
          str(sdist)], env=env, cwd=tmp_path)
    # pip sees this environment's seekr-kernels through the .pth line; it must leave it alone.
    assert metadata.version("seekr-kernels")

    check = (
        "import importlib.metadata as md, os, sys, torch\n"
        "import seekr_kernels as sk, seekr_kernels._C as C\n"
        "print(sk.__file__); print(C.__file__)\n"
        "assert sk.__version__ == md.version('seekr-kernels'), (sk.__version__, md.version('seekr-kernels'))\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(1, 2, 16, 8, generator=g); k = torch.randn(1, 2, 16, 8, generator=g)\n"
        "heads = torch.tensor([[1]]); t = torch.softmax(torch.randn(1, 1, 16, 16, generator=g), -1)\n"
        "a = sk.attention_kl(q, k, t, heads, backend='cpu'); b = sk.attention_kl(q, k, t, heads, backend='torch')\n"
        "assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)\n"
    )
    env.pop("TRITON_INTERPRET", None)
    p = _run([py, "-c", check], env=env, cwd=tmp_path)
    pkg, ext = p.stdout.split()[:2]
    assert pkg.startswith(str(venv)) and ext.startswith(str(venv)), (pkg, ext)

    out = _run([str(venv / "bin" / "seekr"), "--version"], env=env, cwd=tmp_path).stdout
    assert f"seekr-kernels {metadata.version('seekr-kernels')} ({os.path.dirname(pkg)})" in out
    assert re.search(r"cpu .*seekr_kernels\._C: built", out), out
    assert re.search(r"cuda .*seekr_kernels\._C_cuda: not built", out), out


def test_version_has_one_source():
    try:
        import tomllib
    except ModuleNotFoundError:      # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python >= 3.11 or tomli")
    import seekr_kernels as sk
    from seekr_kernels import _version

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)
    assert "version" not in proj["project"] and "version" in proj["project"]["dynamic"]
    assert proj["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "seekr_kernels._version.__version__"}
    assert sk.__version__ is _version.__version__
    # The installed metadata was generated from _version.py; a mismatch means a stale install.
    assert metadata.version("seekr-kernels") == sk.__version__, "reinstall: pip install -e ."


def test_seekr_version_flag(capsys):
    import torch

    import seekr_kernels as sk
    from seekr_kernels import _backend
    from seekr_kernels.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"seekr-kernels {sk.__version__} ")
    assert f"torch {torch.__version__} " in out
    cpu = "built" if _backend.native_cpu() is not None else "not built"
    assert re.search(rf"cpu .*seekr_kernels\._C: {cpu}", out), out
    assert "triton" in out and "torch   plain PyTorch: always" in out


def test_readme_lists_every_extra_as_pyproject_defines_it():
    """The README's extras sentence names every extra of pyproject.toml, and each extra's
    packages the README names elsewhere agree (no two lists that disagree)."""
    import re
    try:
        import tomllib
    except ImportError:            # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    sentence = re.search(r"the extras\s*\n?\(`pip install[^)]*\)\s+are (.*?)\.\n", text, re.S)
    assert sentence, "README: the extras sentence is missing"
    named = re.findall(r"`([a-z]+)`(?: \(([^)]*)\))?", sentence.group(1))
    assert {n for n, _ in named} == set(extras), (sorted(n for n, _ in named), sorted(extras))
    for name, what in named:
        pkgs = [re.split(r"[<>=\[ ]", p)[0].lower() for p in extras[name]]
        if name == "test" or pkgs == [name]:           # `tensorboard` is the tensorboard package
            continue
        for pkg in pkgs:
            assert pkg in what.lower(), f"README: the {name} extra holds {pkg}, the README says ({what})"
