# What a board runs after boot (and after the bootloader picked the image): the wake cycle.
import time

t0 = time.ticks_ms()  # the wake's start: the awake budget counts the imports below
import app  # noqa: E402

app.run(t0)
