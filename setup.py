"""Build script: the package layout lives in pyproject.toml; this compiles the C++ token
loader in csrc/ as the extension module tinyfuse._loader."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

loader = Pybind11Extension(
    "tinyfuse._loader",
    ["csrc/loader.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[loader], cmdclass={"build_ext": build_ext})
