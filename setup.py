"""Builds seekr_kernels' native extensions by driving CMakeLists.txt (pybind11 + ninja).

Package metadata lives in pyproject.toml; this file only adds the CMake build step.

Environment:
    SEEKR_BUILD_EXT=0     install without any native extension (pure Python; the ops fall
                          back to the plain-PyTorch backend with a warning)
    SEEKR_NATIVE_ARCH=1   CPU kernels with -march=native (see CMakeLists.txt)
    SEEKR_BUILD_CUDA, SEEKR_CUDA_ARCHS   the optional CUDA extension (see CMakeLists.txt)
    SEEKR_DEBUG=1         CMake Debug build
    CMAKE_BUILD_PARALLEL_LEVEL           parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    """An extension whose build is left to CMake (no sources for setuptools to compile)."""

    def __init__(self, name, sourcedir=ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(Path(sourcedir).resolve())


def _cmake():
    try:  # the `cmake` wheel (build isolation) ships its own binary
        import cmake
        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("seekr-kernels: cmake (>= 3.18) is needed to build the C++ extension "
                           "(pip install cmake), or set SEEKR_BUILD_EXT=0 to install without it")
    return exe


def _ninja():
    try:
        import ninja
        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("ninja")


class CMakeBuild(build_ext):
    """Configure and build the CMake project once; it writes every module into the package."""

    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if (self.debug or os.environ.get("SEEKR_DEBUG") == "1") else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        ninja = _ninja()
        if ninja and "CMAKE_GENERATOR" not in os.environ:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_args = ["--config", cfg]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ and getattr(self, "parallel", None):
            build_args += [f"-j{self.parallel}"]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake = _cmake()
        # check=True: a failed build fails the install loudly instead of leaving a package
        # that silently runs the slow fallback.
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", *build_args], cwd=build_temp, check=True)

    def copy_extensions_to_source(self):
        # Editable installs: setuptools copies the registered module (_C); the optional
        # _C_cuda, when CMake built it next to _C, comes along too.
        super().copy_extensions_to_source()
        src_dir = Path(self.get_finalized_command("build_py").get_package_dir("seekr_kernels"))
        built = Path(self.build_lib) / "seekr_kernels"   # where build_extension wrote
        for f in built.glob("_C_cuda*"):
            self.copy_file(str(f), str(src_dir / f.name), level=self.verbose)

ext_modules = []
if os.environ.get("SEEKR_BUILD_EXT", "1") != "0":
    ext_modules.append(CMakeExtension("seekr_kernels._C"))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
