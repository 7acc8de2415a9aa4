"""The compiled packet engines (the switch's and the worker's), built by ``pip install`` with the
machine's C compiler.

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
        ),
        Extension(
            "switchreduce.worker._window",
            sources=["switchreduce/worker/_window.c"],
            # nothing fused: the window's arithmetic is quantize.py's and RoundTrip's bit for bit
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-ffp-contract=off"],
            optional=False,
        ),
    ]
)
