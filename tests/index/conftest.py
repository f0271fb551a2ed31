"""Fixtures of the external index tests (``search_engine`` comes from tests/conftest.py)."""
