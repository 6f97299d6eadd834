"""Firmware images: build, sign, verify and install the signed A/B images the bootloader runs."""
