"""Tests that drive a real headless browser (a package so its conftest does not clash with tests/conftest.py)."""
