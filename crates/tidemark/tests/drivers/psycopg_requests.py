"""psycopg in its default mode (autocommit off: every request's statements run inside a
transaction), as an ORM-backed application uses it; run by drivers.rs through `tidemark dev`.

Usage: psycopg_requests.py DSN WRITES
1. One connection writes a row and at once reads it back, each in its own transaction
   (`insert; commit; select; commit`), WRITES times: how many reads missed the row.
2. Writes stop; after a second, four connections make 50 write-free requests each
   (`select ...; commit`): how many ran on a replica (`pg_is_in_recovery()` in the request).
Prints one JSON object.
"""
import json
import sys
import time

import psycopg

DSN = sys.argv[1]
WRITES = int(sys.argv[2])

stale = 0
with psycopg.connect(DSN, connect_timeout=5) as c:
    c.execute("create table requests (id int primary key, v text)")
    c.commit()
    for i in range(WRITES):
        c.execute("insert into requests values (%s, %s)", (i, f"v{i}"))
        c.commit()
        row = c.execute("select v from requests where id = %s", (i,)).fetchone()
        c.commit()
        if row is None or row[0] != f"v{i}":
            stale += 1

time.sleep(1.0)
on_replica = total = wrong = 0
conns = [psycopg.connect(DSN, connect_timeout=5) for _ in range(4)]
for _ in range(50):
    for c in conns:
        recovery, n = c.execute("select pg_is_in_recovery(), count(*) from requests").fetchone()
        c.commit()
        total += 1
        on_replica += bool(recovery)
        wrong += n != WRITES
for c in conns:
    c.close()
print(json.dumps({"writes": WRITES, "stale": stale, "requests": total,
                  "on_replica": on_replica, "wrong_counts": wrong}))
