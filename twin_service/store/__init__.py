"""Twin storage behind one small protocol (see :mod:`twin_service.store.base`)."""
