"""Concurrent writers and durability across kill -9."""

import json
import os
import signal
import subprocess
import time

from glutil import EventReader, parse_event, read_bytes, write_bytes


def test_writers_on_different_keys(c1):
    n, rounds = 8, 200
    r = EventReader(c1.p("c1", "events"))
    procs = [subprocess.Popen(["sh", "-c", f'for i in $(seq {rounds}); do echo "v$i" > '
                               f'c1/config/user.p{w} || exit 1; done'], cwd=c1.mnt)
             for w in range(n)]
    for p in procs:
        assert p.wait(120) == 0
    for w in range(n):
        assert read_bytes(c1.p("c1", "config", f"user.p{w}")) == f"v{rounds}\n".encode()
    last = {}
    for line in r.take(n * rounds, timeout=60):
        md = parse_event(line)["metadata"]
        k = md["key"]
        want_old = "" if k not in last else f"v{last[k]}"
        assert md["old_value"] == want_old, md
        last[k] = last.get(k, 0) + 1
        assert md["value"] == f"v{last[k]}", md
    assert last == {f"user.p{w}": rounds for w in range(n)}
    r.quiet(0.2)
    r.close()


def test_writers_on_the_same_key(c1):
    n, rounds = 4, 100
    write_bytes(c1.p("c1", "config", "user.same"), "init")
    r = EventReader(c1.p("c1", "events"))
    procs = [subprocess.Popen(["sh", "-c", f'for i in $(seq {rounds}); do echo "w{w}-$i" > '
                               f'c1/config/user.same || exit 1; done'], cwd=c1.mnt)
             for w in range(n)]
    for p in procs:
        assert p.wait(120) == 0
    final = read_bytes(c1.p("c1", "config", "user.same")).decode()
    assert final in [f"w{w}-{rounds}\n" for w in range(n)], final
    prev = "init"
    per_writer = {w: 0 for w in range(n)}
    for line in r.take(n * rounds, timeout=60):
        md = parse_event(line)["metadata"]
        assert md["key"] == "user.same"
        assert md["old_value"] == prev, (md, prev)
        prev = md["value"]
        w, i = prev[1:].split("-")
        per_writer[int(w)] += 1
        assert int(i) == per_writer[int(w)], "a writer's values out of order"
    assert prev + "\n" == final
    r.quiet(0.2)
    r.close()


def test_writers_on_different_instances(gl):
    names = [f"c{i}" for i in range(6)]
    for nm in names:
        os.mkdir(gl.p(nm))
    g = EventReader(gl.p("events"))
    procs = [subprocess.Popen(["sh", "-c", f'for i in $(seq 50); do echo "$i" > {nm}/config/user.k '
                               f'|| exit 1; done'], cwd=gl.mnt) for nm in names]
    for p in procs:
        assert p.wait(60) == 0
    counts = {nm: 0 for nm in names}
    for line in g.take(len(names) * 50, timeout=60):
        ev = parse_event(line, instance=json.loads(line)["instance"])
        counts[ev["instance"]] += 1
        assert ev["metadata"]["value"] == str(counts[ev["instance"]])
    assert counts == {nm: 50 for nm in names}
    g.close()


WRITER = r'''
i=0
while [ "$i" -lt 100000 ]; do
    i=$((i + 1))
    # tee checks close(): a write is recorded only once close returned 0
    if printf 'value-%s-%d\n' "$W" "$i" | tee "$D/user.$W$i" > /dev/null 2>&1 &&
       printf '%d\n' "$i" | tee "$D/user.last$W" > /dev/null 2>&1; then
        echo "$i" >> "$LOG"
    fi
done
'''


def test_kill9_mid_writes_loses_no_acknowledged_write(c1, tmp_path):
    env = dict(os.environ, D=c1.p("c1", "config"))
    writers = []
    for w in ("a", "b"):
        log = tmp_path / f"acked-{w}"
        log.write_text("")
        p = subprocess.Popen(["sh", "-c", WRITER], env=dict(env, W=w, LOG=str(log)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writers.append((w, log, p))
    # Let the writers get going, then kill the daemon under them.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and \
            min(len(log.read_text().split()) for _, log, _ in writers) < 100:
        time.sleep(0.05)
    c1.kill9()
    time.sleep(0.3)  # writers now fail (ENOTCONN) and record nothing
    for _, _, p in writers:
        p.send_signal(signal.SIGKILL)
        p.wait()
    c1.start()
    total = 0
    for w, log, _ in writers:
        acked = [int(x) for x in log.read_text().split()]
        assert len(acked) >= 100, f"writer {w} acknowledged only {len(acked)} writes"
        total += len(acked)
        for i in acked:
            path = c1.p("c1", "config", f"user.{w}{i}")
            assert read_bytes(path) == f"value-{w}-{i}\n".encode(), f"lost acknowledged write {i}"
        last = int(read_bytes(c1.p("c1", "config", f"user.last{w}")))
        assert last >= acked[-1]
    assert total >= 200
