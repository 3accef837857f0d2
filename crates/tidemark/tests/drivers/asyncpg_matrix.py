"""Driver scenarios for asyncpg, run once against PostgreSQL directly and once through
tidemark by crates/tidemark/tests/drivers.rs, which compares the two JSON outputs.

Usage: asyncpg_matrix.py DSN SUFFIX  (SUFFIX keeps the two runs' tables/channels apart)
  e.g. python3 asyncpg_matrix.py postgresql://postgres@127.0.0.1:6432/postgres direct1
Prints one JSON object {scenario: result} (keys sorted) and always exits 0. Every scenario
uses its own connections and returns plain data (rows, counts, SQLSTATEs, booleans); an error
is recorded as {"error": SQLSTATE or exception class}, a hang (15 s) as {"error": "timeout"}.
"""
import asyncio
import json
import sys

import asyncpg

DSN = sys.argv[1]
SUF = sys.argv[2]
TIMEOUT = 15


def err(e):
    if isinstance(e, (asyncio.TimeoutError, TimeoutError, asyncio.CancelledError)):
        return {"error": "timeout"}
    sqlstate = getattr(e, "sqlstate", None)
    if isinstance(e, asyncpg.PostgresError) and sqlstate:
        return {"error": sqlstate}
    return {"error": type(e).__name__}


def rows(records):
    return [list(r.values()) for r in records]


class Conn:
    """async with Conn(**kw) as c: a connection closed (or torn down) on the way out."""

    def __init__(self, **kw):
        self.kw = kw
        self.conn = None

    async def __aenter__(self):
        self.kw.setdefault("timeout", 5)
        self.conn = await asyncpg.connect(DSN, **self.kw)
        return self.conn

    async def __aexit__(self, *exc):
        try:
            await asyncio.wait_for(self.conn.close(), 3)
        except BaseException:  # noqa: BLE001 - best effort
            self.conn.terminate()
        return False


SCENARIOS = []


def scenario(f):
    SCENARIOS.append(f)
    return f


@scenario
async def fetch_with_params():
    async with Conn() as c:
        a = await c.fetch("select $1::int + 1 as a, $2::text as b, $3::int as n", 41, "x", None)
        b = await c.fetchval("select $1::text || $2::text", "ab", "cd")
        d = await c.fetchrow("select $1::int[] as arr, $2::bool as t", [1, 2, 3], True)
        return {"fetch": rows(a), "fetchval": b, "fetchrow": list(d.values())}


@scenario
async def prepared_statement():
    async with Conn() as c:
        st = await c.prepare("select $1::int * 2, $2::text")
        out = [list((await st.fetchrow(i, f"s{i}")).values()) for i in range(6)]
        out.append(await st.fetchval(100, "last"))
        out.append([list(r.values()) for r in await st.fetch(7, "many")])
        return out


@scenario
async def statement_cache():
    async with Conn() as c:
        return [await c.fetchval("select $1::int + 1000", i) for i in range(20)]


@scenario
async def statement_cache_disabled():
    async with Conn(statement_cache_size=0) as c:
        return [await c.fetchval("select $1::int + 2000", i) for i in range(10)]


@scenario
async def executemany_insert():
    t = f"apg_many_{SUF}"
    async with Conn() as c:
        await c.execute(f"create table {t} (id int primary key, v text)")
        await c.executemany(f"insert into {t} values ($1, $2)", [(i, f"v{i}") for i in range(50)])
        return {"count": await c.fetchval(f"select count(*) from {t}"),
                "last": await c.fetchval(f"select v from {t} where id = 49")}


@scenario
async def copy_records_to_table():
    t = f"apg_copy_{SUF}"
    async with Conn() as c:
        await c.execute(f"create table {t} (id int, v text)")
        res = await c.copy_records_to_table(t, records=[(i, f"r{i}") for i in range(100)])
        return {"status": res, "count": await c.fetchval(f"select count(*) from {t}"),
                "first": rows(await c.fetch(f"select * from {t} order by id limit 2"))}


@scenario
async def transaction_insert_then_read():
    t = f"apg_tx_{SUF}"
    async with Conn() as c:
        await c.execute(f"create table {t} (id int primary key, v text)")
        async with c.transaction():
            await c.execute(f"insert into {t} values ($1, $2)", 1, "in-tx")
            inside = await c.fetchval(f"select v from {t} where id = $1", 1)
        after = await c.fetchval(f"select v from {t} where id = $1", 1)
        return {"inside": inside, "after": after}


@scenario
async def transaction_unique_violation():
    t = f"apg_uv_{SUF}"
    out = {}
    async with Conn() as c:
        await c.execute(f"create table {t} (id int primary key)")
        await c.execute(f"insert into {t} values (1)")
        try:
            async with c.transaction():
                await c.execute(f"insert into {t} values (2)")
                await c.execute(f"insert into {t} values (1)")
            out["tx"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["tx"] = err(e)
        out["in_transaction"] = c.is_in_transaction()
        out["after"] = await c.fetchval("select 42")
        out["count"] = await c.fetchval(f"select count(*) from {t}")
    return out


@scenario
async def errors():
    out = {}
    async with Conn() as c:
        for name, sql in [("division_by_zero", "select 1/0"),
                          ("undefined_table", "select * from no_such_table_apg"),
                          ("syntax_error", "selec 1"),
                          ("bound_division_by_zero", "select $1::int / 0")]:
            try:
                if "$1" in sql:
                    await c.fetch(sql, 1)
                else:
                    await c.fetch(sql)
                out[name] = "ok"
            except Exception as e:  # noqa: BLE001
                out[name] = err(e)
        out["still_works"] = await c.fetchval("select 1")
    return out


@scenario
async def listen_notify():
    ch = f"apg_ch_{SUF}"
    got = []
    done = asyncio.Event()
    async with Conn() as c, Conn() as other:
        my_pid = c.get_server_pid()

        def cb(_conn, pid, channel, payload):
            got.append({"payload": payload, "channel_ok": channel == ch, "self": pid == my_pid})
            if len(got) >= 2:
                done.set()

        await c.add_listener(ch, cb)
        await other.execute(f"NOTIFY {ch}, 'from-other'")
        await c.execute(f"NOTIFY {ch}, 'from-self'")
        try:
            await asyncio.wait_for(done.wait(), 3)
        except asyncio.TimeoutError:
            pass
        await c.remove_listener(ch, cb)
        return sorted(got, key=lambda x: x["payload"])


@scenario
async def server_pid():
    async with Conn() as c:
        return {"matches_pg_backend_pid": c.get_server_pid() == await c.fetchval("select pg_backend_pid()")}


@scenario
async def read_your_writes():
    t = f"apg_ryw_{SUF}"
    async with Conn() as c:
        await c.execute(f"create table {t} (id int primary key, v int)")
        seen = []
        for i in range(20):
            await c.execute(f"insert into {t} values ($1, $2)", i, i * 10)
            seen.append(await c.fetchval(f"select v from {t} where id = $1", i))
        return seen


@scenario
async def application_name():
    async with Conn(server_settings={"application_name": "am"}) as c:
        return {"current_setting": await c.fetchval("select current_setting('application_name')"),
                "parameter_status": c.get_settings().application_name}


async def run(f):
    try:
        return await asyncio.wait_for(f(), TIMEOUT)
    except BaseException as e:  # noqa: BLE001 - recorded, compared
        return err(e)


async def main():
    results = {}
    for f in SCENARIOS:
        results[f.__name__] = await run(f)
    return results


try:
    out = asyncio.run(main())
except BaseException as e:  # noqa: BLE001
    out = {"main": err(e)}
sys.stdout.write(json.dumps(out, default=str, sort_keys=True) + "\n")
sys.stdout.flush()
sys.exit(0)
