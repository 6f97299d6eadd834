# The node's own check of command arguments, inside the unix port: it reads the generated
# table (op_args.py) from the spec, refuses at each edge of every range, and the ranges of
# ops that set configuration agree with the configuration's own limits.
import json
import os
import sys

import mpunit
import sim

sys.modules["board"] = sim  # what lib/board.py does on a sim node

import commands  # noqa: E402
import config  # noqa: E402
import op_args  # noqa: E402
import proto  # noqa: E402
import state  # noqa: E402

# op -> the configuration key each argument sets (the node applies them through config)
SETS_CONFIG = {
    proto.COMMAND_OP_SET_INTERVAL: ("sample_interval_s",),
    proto.COMMAND_OP_SET_THRESHOLDS: ("temp_low", "temp_high", "humidity_high"),
}


def _valid(spec):
    return [lo for _, lo, _, _ in spec]


def test_every_op_is_checked_at_each_edge():
    for op, (req, spec) in op_args.OP_ARGS.items():
        mpunit.eq(op_args.check(op, _valid(spec)), None)
        mpunit.eq(op_args.check(op, _valid(spec)[:req]), None)
        mpunit.eq(op_args.check(op, [hi for _, _, hi, _ in spec]), None)
        mpunit.eq("want" in op_args.check(op, _valid(spec) + [0]), True)
        if req:
            mpunit.eq("want" in op_args.check(op, _valid(spec)[:req - 1]), True)
        for i, (name, lo, hi, unit) in enumerate(spec):
            for bad in (lo - 1, hi + 1):
                args = _valid(spec)
                args[i] = bad
                if bad < -0x80000000 or bad > 0x7FFFFFFF:
                    continue  # not an i32: the codec refuses it before this check
                why = op_args.check(op, args)
                mpunit.eq(why, ("%s %d: not in %d..%d %s" % (name, bad, lo, hi, unit)).rstrip()[:48])


def test_config_ops_take_the_configuration_ranges():
    for op, keys in SETS_CONFIG.items():
        spec = op_args.OP_ARGS[op][1]
        mpunit.eq(len(spec), len(keys))
        for (name, lo, hi, _), key in zip(spec, keys):
            _, kind, clo, chi = config.SPEC[key]
            mpunit.eq((key, lo, hi), (key, clo, chi))


def _node():
    d = mpunit.tmpdir() + "/node"
    os.mkdir(d)
    with open(d + "/state.json", "w") as f:
        f.write(json.dumps({"vt_ms": 1767225600000, "cause": sim.TIMER, "runs": 1}))
    with open(d + "/sim.json", "w") as f:
        f.write(json.dumps({"seed": 3, "block_count": 64}))
    sim.configure(d)
    sim.init()
    with open(sim.FS_ROOT + "/config.json", "w") as f:
        f.write(json.dumps({"device_id": "n1", "broker_host": "127.0.0.1"}))


def test_execute_refuses_bad_args_and_runs_nothing():
    _node()
    c = config.Config(sim.FS_ROOT)
    st = state.State(sim, sim.FS_ROOT)
    fx = commands.Effects()
    buf = bytearray(128)
    n = commands.execute((1, 20, proto.COMMAND_OP_STAY_AWAKE, [900], 1, 60, b"", 0), c, st, sim, fx, buf, 5)
    r = proto.decode(buf[:n])[1]
    mpunit.eq(r[proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_BAD_ARGS)
    mpunit.eq(r[proto.COMMAND_RESULT_DETAIL], "seconds 900: not in 0..600 s")
    mpunit.eq(fx.stay_awake_ms, 0)
    n = commands.execute((1, 21, proto.COMMAND_OP_SET_INTERVAL, [0], 1, 60, b"", 0), c, st, sim, fx, buf, 6)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_BAD_ARGS)
    mpunit.eq(c.sample_interval_s, 60)
    n = commands.execute((1, 22, proto.COMMAND_OP_PING, [1, 2], 1, 60, b"", 0), c, st, sim, fx, buf, 7)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_DETAIL], "want 0..1 args, got 2")
    n = commands.execute((1, 25, proto.COMMAND_OP_PING, [77], 1, 60, b"", 0), c, st, sim, fx, buf, 10)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_VALUES][1], 77)
    n = commands.execute((1, 23, proto.COMMAND_OP_STAY_AWAKE, [600], 1, 60, b"", 0), c, st, sim, fx, buf, 8)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_OK)
    mpunit.eq(fx.stay_awake_ms, 600000)
    n = commands.execute((1, 24, 99, [], 1, 60, b"", 0), c, st, sim, fx, buf, 9)
    mpunit.eq(proto.decode(buf[:n])[1][proto.COMMAND_RESULT_STATUS], proto.RESULT_STATUS_UNKNOWN_OP)
