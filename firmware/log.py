# Tiny node logger: one line per event on stdout, "<level> <ms since boot> <message>".
# The sim supervisor keeps stdout in node.log; on a board it goes to the USB serial port.
import time

DEBUG = 0
INFO = 1
WARN = 2
ERROR = 3
_TAGS = "DIWE"

level = INFO
_t0 = time.ticks_ms()


def since_boot():
    return time.ticks_diff(time.ticks_ms(), _t0)


def _emit(lvl, msg, args):
    # Nothing is formatted below the level; above it, the message once: print writes the
    # tag and the time piece by piece instead of building the whole line.
    if lvl < level:
        return
    if args:
        msg = msg % args
    print(_TAGS[lvl], since_boot(), msg)


def debug(msg, *args):
    _emit(DEBUG, msg, args)


def info(msg, *args):
    _emit(INFO, msg, args)


def warn(msg, *args):
    _emit(WARN, msg, args)


def error(msg, *args):
    _emit(ERROR, msg, args)


def line(text):
    # Machine-read records (readings "R ...", timings "T ...") go out unprefixed.
    print(text)
