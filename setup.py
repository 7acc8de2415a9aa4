"""The compiled packet engine, built by ``pip install`` with the machine's C compiler.

Everything else is declared in pyproject.toml; setuptools takes extension modules from here.
A build that fails fails the installation: nothing falls back to the Python engine unasked.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "switchreduce.emulation.softswitch._engine",
            sources=["switchreduce/emulation/softswitch/_engine.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],
            optional=False,
        )
    ]
)
