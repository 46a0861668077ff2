"""The two sides of a sandboxed run's pipe (see pipelines/sandbox.py, "Two processes"): `_codec` turns values into
JSON and back, `_candidate_main` serves the program's names in the candidate's own interpreter. Both are shipped
as source into the jail (the standard library only, nothing of this project is importable there).
"""

from __future__ import annotations


def _codec(to_ref, from_ref):  # pragma: no cover - shipped as source to the harness and the candidate
    """(encode, decode) between Python values and JSON for the requests and replies of the two processes.

    Plain data crosses by value and is rebuilt from builtins on the other side: None, bool, int, float, complex,
    str, bytes, bytearray, list, tuple, dict, set, frozenset, range, Fraction, Decimal; a subclass of one of them
    crosses as that plain type (a Counter as the dict it is); an iterator as the list of its items, rebuilt as an
    iterator. Anything else becomes `to_ref(value)`, a JSON object with "$": "ref" that `from_ref` turns back.
    Shipped as source with the harness and with the candidate: standard library only."""
    import decimal
    import fractions
    import itertools

    max_depth, max_items, inf = 100, 1_000_000, float("inf")

    def encode(v, depth=0):
        if depth > max_depth:
            raise ValueError("a value nested over 100 levels deep")
        t, d = type(v), depth + 1
        if v is None or t is bool or t is str:
            return v
        if t is int:
            return v if -(1 << 3000) < v < (1 << 3000) else {"$": "i", "v": hex(v)}
        if t is float:
            return v if v == v and v not in (inf, -inf) else {"$": "f", "v": repr(v)}
        if t is list:
            return [encode(x, d) for x in v]
        if t is tuple:
            return {"$": "t", "v": [encode(x, d) for x in v]}
        if t is dict:
            return {"$": "d", "v": [[encode(k, d), encode(x, d)] for k, x in v.items()]}
        if t is set or t is frozenset:
            return {"$": "s" if t is set else "fs", "v": [encode(x, d) for x in v]}
        if t is complex:
            return {"$": "c", "v": [encode(v.real, d), encode(v.imag, d)]}
        if t is bytes or t is bytearray:
            return {"$": "b" if t is bytes else "ba", "v": v.decode("latin-1")}
        if t is range:
            return {"$": "r", "v": [v.start, v.stop, v.step]}
        if t is fractions.Fraction:
            return {"$": "q", "v": [encode(v.numerator, d), encode(v.denominator, d)]}
        if t is decimal.Decimal:
            return {"$": "m", "v": str(v)}
        for base in (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, frozenset, set):
            if isinstance(v, base):
                return encode(base(v), depth)
        if hasattr(type(v), "__next__") and hasattr(type(v), "__iter__"):
            items = list(itertools.islice(v, max_items + 1))
            if len(items) > max_items:
                raise ValueError("an iterator of over a million items")
            return {"$": "it", "v": [encode(x, d) for x in items]}
        return to_ref(v)

    def decode(v):
        if type(v) is list:
            return [decode(x) for x in v]
        if type(v) is not dict:
            return v  # None, bool, int, float, str as JSON gives them
        tag, body = v.get("$"), v.get("v")
        if tag == "t":
            return tuple(decode(x) for x in body)
        if tag == "d":
            return {decode(k): decode(x) for k, x in body}
        if tag == "s":
            return {decode(x) for x in body}
        if tag == "fs":
            return frozenset(decode(x) for x in body)
        if tag == "it":
            return iter([decode(x) for x in body])
        if tag == "i":
            return int(body, 16)
        if tag == "f":
            return float(body)
        if tag == "c":
            return complex(float(decode(body[0])), float(decode(body[1])))
        if tag == "b":
            return body.encode("latin-1")
        if tag == "ba":
            return bytearray(body.encode("latin-1"))
        if tag == "r":
            return range(int(body[0]), int(body[1]), int(body[2]))
        if tag == "q":
            return fractions.Fraction(int(decode(body[0])), int(decode(body[1])))
        if tag == "m":
            return decimal.Decimal(str(body))
        if tag in ("ref", "mod"):
            return from_ref(v)
        raise ValueError(f"unknown value tag {str(tag)[:20]!r}")

    return encode, decode


def _candidate_main(request_fd: int, reply_fd: int) -> None:  # pragma: no cover - the candidate's process
    """The candidate's side: load the program, then answer the tests' requests until they close the pipe.

    Runs in its own interpreter under its own uid. Nothing here is trusted by the tests: whatever this process
    does, what reaches them is JSON that they decode into plain values and handles (`Remote`)."""
    import json
    import os

    requests = os.fdopen(request_fd, "rb")
    main_pid = os.getpid()
    write, dumps, loads, _exit = os.write, json.dumps, json.loads, os._exit
    out_of_memory = b'{"raise": "MemoryError", "detail": "MemoryError"}\n'
    objects = {}

    def send(data):
        if os.getpid() != main_pid:  # a fork of the program must not answer for it
            _exit(0)
        while data:
            data = data[write(reply_fd, data):]

    def to_ref(value):
        objects[len(objects) + 1] = value
        return {"$": "ref", "id": len(objects), "type": type(value).__name__[:60], "callable": callable(value)}

    encode, decode = _codec(to_ref, lambda tag: objects[tag["id"]])
    namespace = {"__name__": "candidate"}
    import builtins

    saved_builtins = dict(builtins.__dict__)

    def restore_builtins():  # the program may patch abs/len/...; this loop and the codec must not see that
        for name in [k for k in builtins.__dict__ if k not in saved_builtins]:
            del builtins.__dict__[name]
        builtins.__dict__.update(saved_builtins)

    for line in requests:
        restore_builtins()
        args = ()
        try:
            req = loads(line)
            op = req["op"]
            if op == "load":
                exec(compile(req["program"], "<program>", "exec"), namespace)
                restore_builtins()
                names = []
                for name, v in list(namespace.items()):
                    if name.startswith("__"):
                        continue
                    if type(v) is type(os):
                        names.append([name, {"$": "mod", "name": v.__name__}])
                        continue
                    try:  # a global iterator stays one (a reference), it is not read out here
                        names.append([name, to_ref(v) if hasattr(type(v), "__next__") else encode(v)])
                    except ValueError:
                        names.append([name, to_ref(v)])
                reply = {"value": {"$": "d", "v": names}}
            else:
                target = objects[req["id"]]
                if op == "call":
                    args = decode(req["args"])
                    result = target(*args, **{k: decode(x) for k, x in req["kwargs"]})
                    restore_builtins()
                    after = [[i, encode(a)] for i, a in enumerate(args) if type(a) in (list, dict, set, bytearray)]
                    reply = {"value": encode(result), "after": after}
                elif op == "getattr":
                    reply = {"value": encode(getattr(target, req["name"]))}
                else:  # dunder
                    name, extra = req["name"], decode(req["args"])
                    if name == "len":
                        result = len(target)
                    elif name == "iter":
                        result = iter(list(target))
                    elif name == "getitem":
                        result = target[extra[0]]
                    elif name == "contains":
                        result = extra[0] in target
                    elif name == "bool":
                        result = bool(target)
                    else:
                        result = str(target)
                    reply = {"value": encode(result)}
            restore_builtins()  # a property or __len__ of the program ran too
            data = (dumps(reply) + "\n").encode()
        except SystemExit as e:
            data = (dumps({"exit": f"{e}"[:300]}) + "\n").encode()
        except MemoryError:
            namespace.clear()
            objects.clear()
            args = None
            data = out_of_memory
        except BaseException as e:
            restore_builtins()
            try:
                detail = str(e)[:300]
            except BaseException:
                detail = "<unprintable>"
            err = getattr(e, "errno", None)
            data = (dumps({"raise": type(e).__name__[:60], "detail": detail,
                           "errno": err if type(err) is int else None}) + "\n").encode()
        send(data)
    _exit(0)
