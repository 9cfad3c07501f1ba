"""Builds the C++ extension ``protdiff_fast._C`` by driving CMake.

The extension is plain C++ on float buffers (pybind11 + OpenMP); it is not built against
PyTorch, so it compiles in seconds and survives torch upgrades.

Environment knobs:
  PROTDIFF_FAST_NATIVE=1   compile with -march=native (off by default: wheels move between machines)
  PROTDIFF_FAST_DEBUG=1    build type Debug instead of Release
  PROTDIFF_FAST_BUILD_TYPE any CMake build type (RelWithDebInfo keeps symbols for perf; Release strips)
  PROTDIFF_FAST_SANITIZE=address  build with AddressSanitizer (run with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
  CMAKE_BUILD_PARALLEL_LEVEL  number of compile jobs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = "") -> None:
        super().__init__(name, sources=[])
        self.source_dir = os.fspath(Path(source_dir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        output_dir = (Path.cwd() / self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("PROTDIFF_FAST_BUILD_TYPE") or (
            "Debug" if os.environ.get("PROTDIFF_FAST_DEBUG") else "Release")
        native = "ON" if os.environ.get("PROTDIFF_FAST_NATIVE", "0") not in ("", "0") else "OFF"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPROTDIFF_FAST_NATIVE={native}",
            f"-DPROTDIFF_FAST_SANITIZE={os.environ.get('PROTDIFF_FAST_SANITIZE', '')}",
        ]
        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("protdiff_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
