# Downlink COMMAND execution: each op, idempotent by command id. A command that already ran
# (its id is in state's executed list, which survives power cuts) is answered `duplicate`
# and not run again. The result is made durable before it is sent, so a power cut between
# running and reporting still reports it on the next wake.
#
# An op runs before its id is recorded, so a cut in between can run it once more on
# redelivery; every op is therefore written to be harmless when repeated: set_* write the
# same values, stay_awake and sync_time set absolute targets, reboot happens at the end
# of the wake, after its result is recorded.
#
# Argument counts and ranges come from the spec (op_args.py, generated): the gateway
# refuses the same commands when they are queued, so this check meets only a gateway that
# skipped it or a newer spec.
import proto


class Effects:
    """What the wake cycle must do after the window because of commands."""

    # Defaults on the class: a wake without commands stores nothing on the instance.
    stay_awake_ms = 0
    reboot = False
    pending = False  # something staged is answered at the next sending wake: come back soon


def _result(buf, msg_id, command_id, status, code=0, detail="", values=()):
    return proto.encode_command_result(buf, msg_id, command_id, status, code, detail, values)


def execute(cmd, cfg, st, board, effects, buf, msg_id, safe=False):
    """Run decoded COMMAND `cmd`; encode its COMMAND_RESULT into buf; returns the length.

    The result is recorded in `st` (durable) unless it is a duplicate report or a refusal
    in safe mode (the command may run once the node has left it). Returns 0 (nothing to
    send, nothing recorded) when a key rotation step ran out of heap (the gateway sends the
    command again at the next send) or when the last piece of a key list staged it (its
    result is recorded at the start of the next sending wake: keylist.apply_staged).
    """
    cid = cmd[proto.COMMAND_COMMAND_ID]
    if st.was_executed(cid):
        return _result(buf, msg_id, cid, proto.RESULT_STATUS_DUPLICATE)
    op = cmd[proto.COMMAND_OP]
    if safe and op != proto.COMMAND_OP_ROTATE_KEY and op != proto.COMMAND_OP_INSTALL_CERT \
            and op != proto.COMMAND_OP_SET_KEYS:
        # Safe mode listens for a fix (OTA, configuration) and runs nothing else but the
        # upkeep of its certificate (one that expires locks the node out for good, safe
        # mode and all: docs/credentials.md, "Safe mode") and of its firmware keys (a fix
        # signed by a new key needs them: docs/ota.md, "Firmware signing keys").
        return _result(buf, msg_id, cid, proto.RESULT_STATUS_REFUSED, 0, "safe mode")
    exp = cmd[proto.COMMAND_EXPIRES_AT]
    if exp and st.clock_set and board.time() >= exp:
        # Expired by the gateway's time (the clock was set from this window's ACK).
        n = _result(buf, msg_id, cid, proto.RESULT_STATUS_EXPIRED, 0, "ttl over")
        st.record_result(cid, memoryview(buf)[:n])
        return n
    args = cmd[proto.COMMAND_ARGS]
    status = proto.RESULT_STATUS_OK
    detail = ""
    values = ()
    import op_args  # only wakes that receive a command pay for the table

    bad = op_args.check(op, args) if op in op_args.OP_ARGS else None
    if bad is not None:
        status, detail = proto.RESULT_STATUS_BAD_ARGS, bad
    elif op == proto.COMMAND_OP_PING:
        values = (board.time(), args[0]) if args else (board.time(),)
    elif op == proto.COMMAND_OP_SET_INTERVAL:
        err = cfg.apply((("sample_interval_s", args[0]),))
        if err is not None:
            status, detail = proto.RESULT_STATUS_BAD_ARGS, str(err)[:48]
        else:
            values = (cfg.sample_interval_s,)
    elif op == proto.COMMAND_OP_SET_THRESHOLDS:
        entries = [("temp_low", args[0]), ("temp_high", args[1])]
        if len(args) == 3:
            entries.append(("humidity_high", args[2]))
        err = cfg.apply(entries)
        if err is not None:
            status, detail = proto.RESULT_STATUS_BAD_ARGS, str(err)[:48]
        else:
            values = (cfg.temp_low, cfg.temp_high, cfg.humidity_high)
    elif op == proto.COMMAND_OP_STAY_AWAKE:
        effects.stay_awake_ms = max(effects.stay_awake_ms, args[0] * 1000)
        values = (args[0],)
    elif op == proto.COMMAND_OP_REBOOT:
        effects.reboot = True
    elif op == proto.COMMAND_OP_ROTATE_KEY or op == proto.COMMAND_OP_INSTALL_CERT:
        # Device-key rotation (rotate.py): a new key and its request on flash, or one
        # piece of the certificate issued for it. Both are safe to run again.
        import rotate

        if op == proto.COMMAND_OP_ROTATE_KEY:
            r = rotate.rotate_key(cfg, args[0], board)
        else:
            r = rotate.install_cert(cfg, args[0], args[1], args[2], cmd[proto.COMMAND_DATA])
        if r is None:
            return 0  # out of heap: neither kept nor answered, so it comes again
        status, detail = r
        values = (args[0],)
    elif op == proto.COMMAND_OP_INSTALL_PSK:
        # A session key for routine sends (psk.py): stored power-safe, the same key again
        # is a no-op.
        import psk

        if not psk.supported(cfg):
            status, detail = proto.RESULT_STATUS_UNKNOWN_OP, "no TLS-PSK in this build"
        elif not psk.install(cfg, args[0], args[1], cmd[proto.COMMAND_DATA]):
            status, detail = proto.RESULT_STATUS_BAD_ARGS, "key must be 32 bytes"
    elif op == proto.COMMAND_OP_SET_KEYS:
        # One piece of a signed firmware key list (keylist.py). The last one stages the
        # list: its check and its answer come at the start of the next sending wake, which
        # the pending hint brings early.
        import keylist

        r = keylist.put_piece(args[0], args[1], args[2], cmd[proto.COMMAND_DATA], None, cid)
        if r is None:
            effects.pending = True
            return 0
        status, detail = r
        values = (args[0],)
    elif op == proto.COMMAND_OP_SYNC_TIME:
        # The spec's table checked the argument's range; the node's own rule checks that it
        # is a plausible time.
        if st.set_clock(args[0]) is None:
            status, detail = proto.RESULT_STATUS_BAD_ARGS, "not a plausible time"
        else:
            values = (board.time(),)
    else:
        status = proto.RESULT_STATUS_UNKNOWN_OP
    n = _result(buf, msg_id, cid, status, 0, detail, values)
    st.record_result(cid, memoryview(buf)[:n])
    return n
