"""Build script for the one compiled part: the masking addon's DataRow short path
(appliance/masking/_fastrows.c). Everything else is declared in setup.cfg. The extension is
optional at run time: without it the masking addon uses its Python path."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("appliance.masking._fastrows", ["appliance/masking/_fastrows.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=vla"])])
