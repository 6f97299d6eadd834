"""The node simulator: real firmware on the MicroPython unix port with the `sim` board."""
