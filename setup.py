"""Builds the Cython packet engine into pyflannel.dataplane._engine; everything else is plain Python packaging."""

from Cython.Build import cythonize
from setuptools import Extension, setup

engine = Extension(
    "pyflannel.dataplane._engine",
    sources=["src_ext/engine.pyx"],
    include_dirs=["src_ext"],
    extra_compile_args=["-O2", "-Wno-unused-function"],
)

setup(
    ext_modules=cythonize(
        [engine],
        include_path=["src_ext"],
        compiler_directives={"language_level": "3"},
    ),
)
