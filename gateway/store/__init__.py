"""The gateway's SQLite store: the only place with SQL, one module per table owner."""
