# MicroPython side of the cross-runtime test: reads JSON lines, encodes or decodes with the
# generated firmware codec, prints one JSON line per case. Bytes travel as {"hex": ...},
# f32 values as {"f32": <hex of the 4 bytes>} so no float formatting gets in the way.
import json
import struct
import sys

import proto

BUF = bytearray(proto.MAX_FRAME)


def unwire(v):
    if isinstance(v, dict):
        if "hex" in v:
            return bytes.fromhex(v["hex"])
        if "f32" in v:
            return struct.unpack("<f", bytes.fromhex(v["f32"]))[0]
    if isinstance(v, list):
        return [unwire(x) for x in v]
    return v


def wire(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"hex": bytes(v).hex()}
    if isinstance(v, float):
        return {"f32": struct.pack("<f", v).hex()}
    if isinstance(v, (list, tuple)):
        return [wire(x) for x in v]
    return v


for line in sys.stdin:
    case = json.loads(line)
    try:
        if case["op"] == "encode":
            fn = getattr(proto, "encode_" + case["frame"])
            args = [unwire(a) for a in case["args"]]
            kwargs = {}
            for k, v in case["kwargs"].items():
                kwargs[k] = unwire(v)
            n = fn(BUF, *args, **kwargs)
            print(json.dumps({"hex": bytes(BUF[:n]).hex()}))
        else:
            ftype, values = proto.decode(bytes.fromhex(case["hex"]))
            print(json.dumps({"type": ftype, "values": wire(values)}))
    except proto.ProtocolError as e:
        print(json.dumps({"error": str(e)}))
