# What a board runs after boot (and after the bootloader picked the image): the wake cycle.
import app

app.run()
