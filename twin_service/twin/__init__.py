"""The pure twin-state core: no asyncio, database, MQTT or HTTP in here."""
