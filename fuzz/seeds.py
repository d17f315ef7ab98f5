#!/usr/bin/env python3
"""Write the seed corpora of the fuzz harnesses into fuzz/corpus/<harness>/.

The HTTP seeds are the requests of the LXD 5.0.2 conformance captures
(../shared/specs/lxd-5.0.2-captures/*.txt, the ">>> REQUEST (repr)" lines)
plus requests that reach each response mode of fuzz_http.c; the others are
written here from the formats in docs/ and the headers. Run it again after
the captures change; it only adds or replaces its own files (seed-*).

    python3 fuzz/seeds.py [captures-dir]
"""
import ast
import glob
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CAPS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    HERE, "..", "..", "shared", "specs", "lxd-5.0.2-captures")


def write(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def capture_requests():
    reqs = []
    for path in sorted(glob.glob(os.path.join(CAPS, "*.txt"))):
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(">>> REQUEST") and i + 1 < len(lines):
                nxt = lines[i + 1]
                if nxt.startswith("b'") or nxt.startswith('b"'):
                    try:
                        reqs.append(ast.literal_eval(nxt))
                    except (ValueError, SyntaxError):
                        pass
    seen, out = set(), []
    for r in reqs:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def ws_frame(op, payload, fin=True, mask=b"\x37\xfa\x21\x3d", masked=True):
    b0 = (0x80 if fin else 0) | op
    n = len(payload)
    if n < 126:
        hdr = bytes([b0, (0x80 if masked else 0) | n])
    elif n < 65536:
        hdr = bytes([b0, (0x80 if masked else 0) | 126]) + struct.pack(">H", n)
    else:
        hdr = bytes([b0, (0x80 if masked else 0) | 127]) + struct.pack(">Q", n)
    if not masked:
        return hdr + payload
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return hdr + mask + body


def frame(ftype, fid, payload, flags=0):
    return struct.pack(">IIBB", len(payload), fid, ftype, flags) + payload


def main():
    reqs = capture_requests()
    if not reqs:
        sys.exit("seeds: no requests found in %s" % CAPS)
    # http / devlxd: split mode byte, two seed bytes, then the request
    for i, r in enumerate(reqs):
        write("devlxd", "cap%02d" % i, b"\0\0\0" + r)
        write("http", "cap%02d" % i, b"\0\0\0" + r)
    host = b"Host: lxd\r\n"
    upgrade = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    ws_tail = ws_frame(0x9, b"hi") + ws_frame(0xA, b"keepalive") + \
        ws_frame(0x8, b"\x03\xe8")
    extra = {
        "ws-events": b"GET /1.0/events?type=config,device HTTP/1.1\r\n" + host +
                     upgrade + ws_tail,
        "events-plain": b"GET /1.0/events?since=0&type=lifecycle HTTP/1.1\r\n" + host + b"\r\n",
        "export-range": b"GET /1.0/images/05fb4e3cbc61/export HTTP/1.1\r\n" + host +
                        b"Range: bytes=2-5,-3\r\nIf-None-Match: \"x\"\r\n\r\n",
        "export-head": b"HEAD /1.0/images/05fb4e3cbc61661ad118936ddaeb0ebea0dd66aa8c4f6d1e"
                       b"01601294b2a37d32/export HTTP/1.1\r\n" + host +
                       b"If-Modified-Since: Sun, 22 Nov 2026 23:42:01 GMT\r\n\r\n",
        "patch-chunked": b"PATCH /1.0 HTTP/1.1\r\n" + host +
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"7\r\n{\"state\r\na\r\n\":\"Ready\"}\r\n0\r\n\r\n",
        "patch-continue": b"PATCH /1.0 HTTP/1.1\r\n" + host +
                          b"Expect: 100-continue\r\nContent-Length: 19\r\n\r\n"
                          b"{\"state\":\"Started\"}",
        "pipeline": b"GET /1.0/config HTTP/1.1\r\n" + host + b"\r\n"
                    b"GET /1.0/devices HTTP/1.1\r\n" + host + b"\r\n"
                    b"GET /1.0/meta-data HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                    b"GET /1.0/config/cloud-init.user-data HTTP/1.1\r\n" + host +
                    b"Connection: close\r\n\r\n",
        "redirect": b"GET /1.0/./config/../config//user.foo?x=%41 HTTP/1.1\r\n" + host + b"\r\n",
        "absolute": b"GET http://lxd/1.0/config/user%2Efoo HTTP/1.1\r\n" + host + b"\r\n",
        "options-star": b"OPTIONS * HTTP/1.1\r\n" + host + b"\r\n",
        # route variables around the sizes the code keeps on the stack
        "long-key": b"GET /1.0/config/user." + b"k" * 495 + b" HTTP/1.1\r\n" + host + b"\r\n",
        "long-key-escaped": b"GET /1.0/config/user.%6B" + b"k" * 600 + b" HTTP/1.1\r\n" +
                            host + b"\r\n",
        "long-fp": b"GET /1.0/images/" + b"0" * 70 + b"/export HTTP/1.1\r\n" + host + b"\r\n",
    }
    for name, r in extra.items():
        write("devlxd", name, b"\0\0\0" + r)
        write("devlxd", name + "-bytewise", b"\x01\0\x01" + r)
        # split mode 255: each head is a read of its own, so frames after an
        # upgrade arrive after the 101
        write("devlxd", name + "-byhead", b"\xff\0\0" + r)
    # fuzz_http.c's response modes (first byte of the path)
    modes = {
        "body": b"POST /body HTTP/1.1\r\n" + host + b"Content-Length: 11\r\n\r\nhello world",
        "bigbody": b"PUT /Big HTTP/1.1\r\n" + host +
                   b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "error": b"GET /e%20rror HTTP/1.1\r\n" + host + b"\r\n",
        "stream": b"GET /stream HTTP/1.1\r\n" + host + b"\r\nHEAD /sx HTTP/1.1\r\n" + host + b"\r\n",
        "hijack": b"GET /hijack HTTP/1.1\r\n" + host + b"\r\nleftover bytes",
        "ws": b"GET /ws HTTP/1.1\r\n" + host + upgrade + ws_tail,
        "ws-bad": b"POST /ws HTTP/1.1\r\n" + host + upgrade,
        "later": b"GET /defer HTTP/1.1\r\n" + host + b"\r\nGET /dx HTTP/1.1\r\n" + host + b"\r\n",
        "close": b"GET /xc HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "expect": b"POST /b HTTP/1.1\r\n" + host + b"Expect: 100-continue\r\n"
                  b"Content-Length: 4\r\n\r\nbody",
        "expect-bad": b"POST / HTTP/1.1\r\n" + host + b"Expect: nope\r\n\r\n",
        "te-bad": b"POST /b HTTP/1.1\r\n" + host + b"Transfer-Encoding: gzip\r\n\r\n",
        "two-hosts": b"GET / HTTP/1.1\r\n" + host + host + b"\r\n",
        "folded": b"GET / HTTP/1.1\r\n" + host + b"X-A: a\r\n  b\r\nAccept: x\r\nAccept: y\r\n\r\n",
    }
    for name, r in modes.items():
        write("http", name, b"\0\0\0" + r)
        write("http", name + "-split", b"\x03\x12\x34" + r)
        write("http", name + "-byhead", b"\xff\0\0" + r)
    # patch: framing byte, then the body
    bodies = [b'{"state":"Ready"}', b'{"state":"Started"}', b'{"state":null}', b"null",
              b'{"state":3}', b"[1,2]", b'{"state":"Ready\\u0000"}', b'"Ready"',
              b'{"state":"Ready","state":"Started"}', b"", b"{", b'{"state":"\xff"}',
              b' {"x":{"y":[true,false,1.5e300]}} ']
    for i, body in enumerate(bodies):
        write("patch", "b%02d" % i, bytes([i % 8]) + body)
    # ws: split mode, flags, seed, then client frames
    ws = {
        "ping-pong-close": ws_frame(0x9, b"abc") + ws_frame(0xA, b"keepalive") +
                           ws_frame(0x8, b"\x03\xe8bye"),
        "close-bad-code": ws_frame(0x8, b"\x03\xed"),
        "close-short": ws_frame(0x8, b"\x03"),
        "text": ws_frame(0x1, b"hello"),
        "unmasked": ws_frame(0x9, b"x", masked=False),
        "frag-ctl": ws_frame(0x9, b"x", fin=False),
        "long-ctl": ws_frame(0x9, b"p" * 126),
        "len64": ws_frame(0x9, b"") [:1] + b"\xff" + b"\0" * 7 + b"\x10",
        "rsv": bytes([0xc9, 0x80]) + b"\0\0\0\0",
    }
    for i, (name, f) in enumerate(ws.items()):
        write("ws", name, bytes([0, i % 16, 0]) + f)
        write("ws", name + "-bytewise", bytes([1, 1, 7]) + f)
    # frame: split mode, max selector, then the byte stream
    hello = b'{"version":1,"nonce":"AAAA","instance":"vm1"}'
    stream = frame(1, 0, hello) + frame(4, 7, b'{"op":"ping"}') + \
        frame(6, 7, b"raw bytes", 2) + frame(7, 7, b'{"signal":9}', 1) + \
        frame(99, 3, b"unknown type") + frame(8, 0, b'{"error":"x","errno":2}')
    write("frame", "stream", b"\0\0" + stream)
    write("frame", "stream-bytewise", b"\x01\0" + stream)
    write("frame", "oversize", b"\0\0" + struct.pack(">IIBB", 5000, 0, 1, 0) + b"x" * 32)
    write("frame", "json-not-object", b"\0\0" + frame(4, 1, b"[1,2,3]") + frame(4, 2, b"{bad"))
    write("frame", "nul-in-json", b"\0\0" + frame(4, 1, b'{"a":"\\u0000"}') + frame(4, 2, b'{"a":1}\0'))
    # fconn: split mode, seed, bytes pre-read, then the stream
    write("fconn", "stream", b"\0\0\0" + stream)
    write("fconn", "stream-pre", b"\x02\x05\x0c" + stream)
    write("fconn", "auth-then-big", b"\0\0\0" + frame(3, 0, b"{}") + frame(4, 1, b"x" * 6000) +
          frame(7, 1, b"{}"))
    write("fconn", "big-before-auth", b"\0\0\0" + frame(4, 1, b"x" * 6000))
    write("fconn", "error-close", b"\x01\x07\0" + frame(4, 1, b"{}") + frame(8, 0, b"{}") +
          frame(4, 2, b"{}"))
    # connect: which parser, then the line
    for i, line in enumerate([b"CONNECT 52\n", b"connect 1024 extra words\n", b"CONNECT\t7\n",
                              b"CONNECT 4294967296\n", b"CONNECT -1\n", b"OK 1073741824",
                              b"OK", b"OK ", b"ok 5", b"CONNECT 52", b"CONNECT \xc3\xa9 5\n",
                              b"CONNECT 00000000000000000000000052\n"]):
        write("connect", "l%02d" % i, bytes([0 if line[:1] in b"Cc" else 1]) + line)


if __name__ == "__main__":
    main()
