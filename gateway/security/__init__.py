"""Security: the fleet PKI, credential lifetimes and the signed firmware manifest model."""
