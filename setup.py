"""Builds the Cython packet engine into pyflannel.dataplane._engine, its C parts for tests and micro-benchmarks into
pyflannel.dataplane._testing, and flannel-bench's two C loops: the
reference for flannel's own udp design (pyflannel.bench._flannel_c) and the request/response probe
(pyflannel.bench._rr_probe); everything else is plain Python packaging."""

from Cython.Build import cythonize
from setuptools import Extension, setup

engine = Extension(
    "pyflannel.dataplane._engine",
    sources=["src_ext/engine.pyx"],
    include_dirs=["src_ext"],
    extra_compile_args=["-O2", "-Wno-unused-function"],
)

testing = Extension(
    "pyflannel.dataplane._testing",
    sources=["src_ext/testing.pyx"],
    include_dirs=["src_ext"],
    extra_compile_args=["-O2", "-Wno-unused-function"],
)

flannel_c = Extension(
    "pyflannel.bench._flannel_c",
    sources=["src_ext/flannel_c.pyx"],
    include_dirs=["src_ext"],
    extra_compile_args=["-O2"],
)

rr_probe = Extension(
    "pyflannel.bench._rr_probe",
    sources=["src_ext/rr_probe.pyx"],
    extra_compile_args=["-O2"],
)

setup(
    ext_modules=cythonize(
        [engine, testing, flannel_c, rr_probe],
        include_path=["src_ext"],
        compiler_directives={"language_level": "3"},
    ),
)
