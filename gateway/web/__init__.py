"""The operator's web page and its JSON API (HTTP and presentation only; the queries and
actions are in gateway.ops)."""
