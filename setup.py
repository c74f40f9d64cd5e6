"""Build script for the compiled parts: the masking addon's row scanners
(appliance/masking/_fastrows.c) and the session relay's run framing
(appliance/pgwire/_runs.c). Everything else is declared in setup.cfg. Both are optional at
run time: without them the same work is done in Python."""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=vla"]

setup(ext_modules=[
    Extension("appliance.masking._fastrows", ["appliance/masking/_fastrows.c"], extra_compile_args=_FLAGS),
    Extension("appliance.pgwire._runs", ["appliance/pgwire/_runs.c"], extra_compile_args=_FLAGS),
])
