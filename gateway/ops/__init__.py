"""Operator queries and actions: each takes a database connection, returns dataclasses and
never prints. The web page and API (gateway.web) are built on these; they use only the
public functions of the modules that own the tables."""
