"""Build script. The package layout lives in pyproject.toml; this file is where
the C++ token loader from csrc/ will be compiled as an extension."""
from setuptools import setup

setup()
