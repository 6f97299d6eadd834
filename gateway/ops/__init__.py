"""Operator queries and actions: each returns dataclasses and never prints. The commands
(gateway.cli) and the web page and API (gateway.web) are built on these; they use only the
public functions of the store, transport and security modules."""
