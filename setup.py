"""Builds kvwire's one compiled module; everything else is in pyproject.toml.

The module is optional: where it cannot be compiled (no C compiler, or no numpy to build
against), kvwire runs the same loops in Python (kvwire/native.py says which one is in use).
"""

from setuptools import Extension, setup

try:
    import numpy
except ImportError:  # (a build without its build requirements): the Python twins only
    extensions = []
else:
    extensions = [Extension("kvwire._native", ["kvwire/_native.c"], include_dirs=[numpy.get_include()], optional=True)]

setup(ext_modules=extensions)
