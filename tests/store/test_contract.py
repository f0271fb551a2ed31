"""The store contract on every store (see ``contract.py``)."""

from __future__ import annotations

from tests.store.contract import StoreContract


class TestStoreContract(StoreContract):
    """Runs once per ``store_factory`` parameter: SQLite and MongoDB (FerretDB)."""
