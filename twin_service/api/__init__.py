"""The HTTP and WebSocket adapter (FastAPI)."""
