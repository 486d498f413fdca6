"""Builds kvwire's one compiled module; everything else is in pyproject.toml.

The module is optional: where it cannot be compiled (no C compiler), kvwire runs the
same loops in Python (kvwire/native.py says which one is in use).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvwire._native", ["kvwire/_native.c"], optional=True)])
