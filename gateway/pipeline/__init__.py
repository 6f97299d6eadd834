"""The supervised concerns: ingest and its answers, downlink, OTA delivery, relay, formats."""
