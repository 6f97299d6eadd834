# Torpor command arguments for MicroPython (the firmware): what each op takes.
# Generated from shared/protocol/torpor.toml by `torpor proto gen`: generated, do not edit.
# The gateway checks the same table (gateway/proto.py OP_ARGS) before it queues a command.
import proto

# command op -> (required count, ((name, low, high, unit), ...))
OP_ARGS = {
    proto.COMMAND_OP_PING: (0, (('tag', -2147483648, 2147483647, ''),)),
    proto.COMMAND_OP_SET_INTERVAL: (1, (('sample_interval_s', 1, 86400, 's'),)),
    proto.COMMAND_OP_SET_THRESHOLDS: (2, (('temp_low', -32768, 32767, '0.01 degC'), ('temp_high', -32768, 32767, '0.01 degC'), ('humidity_high', 0, 65535, '0.01 %RH'),)),
    proto.COMMAND_OP_STAY_AWAKE: (1, (('seconds', 0, 600, 's'),)),
    proto.COMMAND_OP_REBOOT: (0, ()),
    proto.COMMAND_OP_SYNC_TIME: (1, (('time', 0, 2147483647, 'unix seconds'),)),
    proto.COMMAND_OP_ROTATE_KEY: (1, (('rotation', 1, 2147483647, ''),)),
    proto.COMMAND_OP_INSTALL_CERT: (3, (('rotation', 1, 2147483647, ''), ('offset', 0, 4095, 'bytes'), ('total', 1, 4096, 'bytes'),)),
    proto.COMMAND_OP_SET_KEYS: (3, (('seq', 1, 2147483647, ''), ('offset', 0, 2047, 'bytes'), ('total', 65, 2048, 'bytes'),)),
    proto.COMMAND_OP_INSTALL_PSK: (2, (('key_id', 1, 2147483647, ''), ('port', 1, 65535, ''),)),
}


def check(op, args):
    # None if args suit the known op, else why not, short enough for COMMAND_RESULT.detail
    req, spec = OP_ARGS[op]
    n = len(args)
    if n < req or n > len(spec):
        if req == len(spec):
            return "want %d arg%s, got %d" % (req, "" if req == 1 else "s", n)
        return "want %d..%d args, got %d" % (req, len(spec), n)
    for i in range(n):
        name, lo, hi, unit = spec[i]
        v = args[i]
        if v < lo or v > hi:
            return ("%s %d: not in %d..%d %s" % (name, v, lo, hi, unit)).rstrip()[:48]
    return None
