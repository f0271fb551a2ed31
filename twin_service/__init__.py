"""twin-service: a digital twin state service."""

__version__ = "0.1.0"
