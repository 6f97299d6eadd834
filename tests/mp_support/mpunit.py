# Helpers for MicroPython test modules (tests/**/mptest_*.py), run by tests/mpharness.py.
import os


class SkipTest(Exception):
    pass


def tmpdir():
    # A fresh directory per test, made by pytest on the host side.
    return os.getenv("MPTEST_TMP") or "."


def repo_root():
    return os.getenv("MPTEST_ROOT") or "."


def eq(a, b, msg=""):
    if a != b:
        raise AssertionError("%r != %r %s" % (a, b, msg))


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return e
    raise AssertionError("%s not raised" % exc.__name__)
