# The harness itself: one pytest item per function, skips and failures reported.
import sys

import mpunit


def test_runs_in_micropython():
    mpunit.eq(sys.implementation.name, "micropython")


def test_skip_is_reported():
    raise mpunit.SkipTest("skips are reported as skips, not passes")
