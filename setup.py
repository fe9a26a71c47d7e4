"""Builds the one native piece, score_fast._C (csrc/), and nothing else: metadata is in
pyproject.toml. The extension is optional: where it cannot build, score_fast falls back to
its pure-Python packing (same results, slower) and says so in score_fast.packing.BACKEND."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "score_fast._C",
    ["csrc/packing.cpp", "csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)
ext.optional = True  # a failed build warns instead of failing the install

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
