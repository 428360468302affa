# The metadata lives in pyproject.toml ([project]); this file only hands over to setuptools (scripts/dev.py keys its
# install stamp on it, and old pips that want a setup.py for editable installs find one).
from setuptools import setup

setup()
