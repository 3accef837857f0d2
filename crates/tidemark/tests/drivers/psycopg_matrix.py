"""Driver scenarios for psycopg 3, run once against PostgreSQL directly and once through
tidemark by crates/tidemark/tests/drivers.rs, which compares the two JSON outputs.

Usage: psycopg_matrix.py DSN SUFFIX  (SUFFIX keeps the two runs' tables apart)
Every scenario returns plain data (rows, SQLSTATEs, ParameterStatus values, notices); an error
is recorded as {"error": SQLSTATE}, a hang as {"error": "timeout"}.
"""
import json
import signal
import sys

import psycopg
from psycopg import errors, pq

DSN = sys.argv[1]
SUF = sys.argv[2]
TIMEOUT = 15


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout()


signal.signal(signal.SIGALRM, _alarm)


def connect(**kw):
    kw.setdefault("autocommit", True)
    kw.setdefault("connect_timeout", 5)
    return psycopg.connect(DSN, **kw)


def err(e):
    if isinstance(e, Timeout):
        return {"error": "timeout"}
    if isinstance(e, psycopg.Error):
        return {"error": e.sqlstate or type(e).__name__}
    return {"error": type(e).__name__ + ": " + str(e)}


SCENARIOS = []


def scenario(f):
    SCENARIOS.append(f)
    return f


PARAMS = ["application_name", "client_encoding", "in_hot_standby",
          "default_transaction_read_only", "DateStyle", "integer_datetimes",
          "standard_conforming_strings", "session_authorization", "IntervalStyle"]


@scenario
def parameter_status():
    out = {}
    with connect(application_name="matrix-app") as c:
        out["given"] = {k: c.info.parameter_status(k) for k in PARAMS}
    with psycopg.connect(DSN, autocommit=True) as c:
        out["default"] = {k: c.info.parameter_status(k) for k in PARAMS}
    with connect() as c:
        c.execute("SET application_name = 'changed'")
        out["after_set"] = c.info.parameter_status("application_name")
    return out


@scenario
def simple_and_server_binding():
    with connect() as c:
        a = c.execute("select 1, 'a'::text, null::int").fetchall()
        b = c.execute("select %s::int + 1, %s::text", (41, "x")).fetchall()
        return {"simple": a, "bound": b}


@scenario
def prepare_threshold_zero():
    with connect(prepare_threshold=0) as c:
        return [c.execute("select %s::int * 2", (i,)).fetchone()[0] for i in range(6)]


@scenario
def pipeline_insert_then_select():
    t = f"pipe_{SUF}"
    with connect() as c:
        c.execute(f"create table {t} (id int primary key, v text)")
        seen = []
        for i in range(30):
            with c.pipeline():
                c.execute(f"insert into {t} values (%s, %s)", (i, f"v{i}"))
                cur = c.execute(f"select v from {t} where id = %s", (i,))
            seen.append(cur.fetchone()[0])
        return seen


@scenario
def executemany_autocommit():
    t = f"many_{SUF}"
    with connect() as c:
        c.execute(f"create table {t} (id int primary key)")
        counts = []
        for call in range(3):
            with c.cursor() as cur:
                cur.executemany(f"insert into {t} values (%s)", [(call * 100 + i,) for i in range(10)])
            counts.append(c.execute(f"select count(*) from {t}").fetchone()[0])
        return counts


@scenario
def pipeline_first_statement_fails():
    t = f"pfail_{SUF}"
    out = {}
    with connect() as c:
        c.execute(f"create table {t} (id int primary key)")
        c.execute(f"insert into {t} values (1)")
        try:
            with c.pipeline():
                c.execute(f"insert into {t} values (1)")
                c.execute(f"insert into {t} values (2)")
                c.execute("select 1")
        except psycopg.Error as e:
            out["pipeline"] = err(e)
        out["after"] = c.execute(f"select count(*) from {t}").fetchone()[0]
    return out


@scenario
def target_session_attrs():
    out = {}
    for attrs in ["read-write", "primary", "any"]:
        try:
            with psycopg.connect(DSN, autocommit=True, target_session_attrs=attrs, connect_timeout=5) as c:
                out[attrs] = c.execute("select 1").fetchone()[0]
        except Exception as e:
            out[attrs] = err(e)
    return out


@scenario
def show_read_only():
    with connect() as c:
        return [c.execute(f"show {n}").fetchone()[0] for n in
                ["transaction_read_only", "default_transaction_read_only"]]


@scenario
def client_encodings():
    out = {}
    for enc, text in [("LATIN9", "café €"), ("EUC_JP", "日本語"), ("WIN1252", "naïve")]:
        with connect() as c:
            c.execute(f"SET client_encoding TO '{enc}'")
            r = {"status": c.info.parameter_status("client_encoding")}
            r["simple"] = c.execute(f"select '{text}'::text, length('{text}')").fetchone()
            r["bound"] = c.execute("select %s::text", (text,)).fetchone()[0]
            out[enc] = r
    with psycopg.connect(DSN, autocommit=True, client_encoding="LATIN1") as c:
        out["startup_latin1"] = {"status": c.info.parameter_status("client_encoding"),
                                 "row": c.execute("select 'ñ'::text").fetchone()[0]}
    return out


@scenario
def unlogged_and_temp_reads():
    t = f"unl_{SUF}"
    with connect() as c:
        c.execute(f"create unlogged table {t} (id int)")
        c.execute(f"insert into {t} values (1), (2)")
        a = c.execute(f"select count(*) from {t}").fetchone()[0]
    with connect() as c:
        b = c.execute(f"select count(*) from {t}").fetchone()[0]
    return [a, b]


@scenario
def prepared_statement_lifecycle():
    out = {}
    with connect(prepare_threshold=0) as c:
        q = "select %s::int + 100"
        out["first"] = [c.execute(q, (i,)).fetchone()[0] for i in range(2)]
        c.execute("DISCARD ALL")
        out["after_discard"] = [c.execute(q, (i,)).fetchone()[0] for i in range(2)]
        c.execute("DEALLOCATE ALL")
        out["after_deallocate"] = [c.execute(q, (i,)).fetchone()[0] for i in range(2)]
    with connect(prepare_threshold=0) as c:
        c.prepared_max = 2
        vals = []
        for rnd in range(3):
            for k in range(5):
                vals.append(c.execute(f"select %s::int + {k}", (rnd,)).fetchone()[0])
        out["lru"] = vals
    with connect() as c:
        c.execute("PREPARE mine AS select $1::int * 3")
        out["sql_prepare"] = c.execute("EXECUTE mine(5)").fetchone()[0]
        c.execute("DEALLOCATE mine")
        c.execute("PREPARE mine AS select $1::int * 4")
        out["sql_reprepare"] = c.execute("EXECUTE mine(5)").fetchone()[0]
    return out


@scenario
def server_side_cursor():
    with connect(autocommit=False) as c:
        with c.cursor(name="matrix_cur") as cur:
            cur.execute("select g from generate_series(1, 25) g")
            a = cur.fetchmany(10)
            b = cur.fetchall()
        c.commit()
        return [len(a), len(b), b[-1][0]]


@scenario
def copy_in_and_out():
    t = f"copy_{SUF}"
    with connect() as c:
        c.execute(f"create table {t} (id int, v text)")
        with c.cursor() as cur:
            with cur.copy(f"COPY {t} FROM STDIN") as cp:
                for i in range(50):
                    cp.write_row((i, f"r{i}"))
            out = []
            with cur.copy(f"COPY (select * from {t} order by id limit 3) TO STDOUT") as cp:
                for row in cp.rows():
                    out.append(list(row))
        n = c.execute(f"select count(*) from {t}").fetchone()[0]
        return {"count": n, "out": out}


@scenario
def listen_notify():
    with connect() as c, connect() as other:
        c.execute("LISTEN matrix_ch")
        other.execute("NOTIFY matrix_ch, 'from-other'")
        c.execute("NOTIFY matrix_ch, 'from-self'")
        got = []
        for n in c.notifies(timeout=2, stop_after=2):
            got.append({"payload": n.payload, "self": n.pid == c.info.backend_pid})
        return sorted(got, key=lambda x: x["payload"])


@scenario
def read_your_writes_in_transactions():
    t = f"ryw_{SUF}"
    with connect() as c:
        c.execute(f"create table {t} (id int primary key, v int)")
    seen = []
    with connect(autocommit=False) as c:
        for i in range(20):
            c.execute(f"insert into {t} values (%s, %s)", (i, i))
            c.commit()
            seen.append(c.execute(f"select v from {t} where id = %s", (i,)).fetchone()[0])
            c.commit()
    return seen


@scenario
def orm_style_requests():
    """psycopg's default mode: every request's statements inside a transaction, most of them
    only reading, some reading then writing (savepoints, SET LOCAL, prepared statements)."""
    t = f"orm_{SUF}"
    out = []
    with connect(autocommit=False, prepare_threshold=0) as c:
        c.execute(f"create table {t} (id int primary key, n int)")
        c.execute(f"insert into {t} select g, 0 from generate_series(1, 5) g")
        c.commit()
        for i in range(12):
            row = c.execute(f"select n from {t} where id = %s", (i % 5 + 1,)).fetchone()
            total = c.execute(f"select sum(n) from {t}").fetchone()[0]
            if i % 3 == 2:
                c.execute("SET LOCAL statement_timeout = '5s'")
                with c.transaction():  # a savepoint
                    c.execute(f"select count(*) from {t}").fetchone()
                c.execute(f"update {t} set n = n + 1 where id = %s", (i % 5 + 1,))
                after = c.execute(f"select n from {t} where id = %s", (i % 5 + 1,)).fetchone()[0]
            else:
                after = None
            c.commit()
            out.append([row[0], total, after])
        out.append(c.execute("show statement_timeout").fetchone()[0])
        c.rollback()
    return out


@scenario
def transaction_error_then_rollback():
    out = {}
    with connect(autocommit=False) as c:
        out["first"] = c.execute("select 41 + 1").fetchone()[0]
        for sql in ["select 1/0", "select 2"]:
            try:
                c.execute(sql)
                out[sql] = "ok"
            except psycopg.Error as e:
                out[sql] = err(e)
        c.rollback()
        out["after_rollback"] = c.execute("select 3").fetchone()[0]
        c.commit()
    return out


@scenario
def pipeline_in_a_transaction():
    t = f"pipe_tx_{SUF}"
    with connect() as c:
        c.execute(f"create table {t} (id int primary key, v text)")
        c.autocommit = False
        with c.pipeline():
            before = c.execute(f"select count(*) from {t}")
            c.execute(f"insert into {t} values (1, 'a')")
            mid = c.execute(f"select v from {t} where id = 1")
            c.executemany(f"insert into {t} values (%s, %s)", [(i, "m") for i in range(2, 6)])
            after = c.execute(f"select count(*) from {t}")
        res = [before.fetchone()[0], mid.fetchone()[0], after.fetchone()[0]]
        c.commit()
        res.append(c.execute(f"select count(*) from {t}").fetchone()[0])
        c.commit()
    return res


@scenario
def isolation_levels_and_read_only():
    t = f"iso_{SUF}"
    out = {}
    with connect() as c:
        c.execute(f"create table {t} (id int primary key, n int)")
        c.execute(f"insert into {t} values (1, 10)")
        c.autocommit = False
        for level in ["READ_COMMITTED", "REPEATABLE_READ", "SERIALIZABLE"]:
            for ro in [False, True]:
                key = f"{level.lower()}{'_ro' if ro else ''}"
                c.isolation_level = getattr(psycopg.IsolationLevel, level)
                c.read_only = ro
                try:
                    n = c.execute(f"select n from {t} where id = 1").fetchone()[0]
                    shown = c.execute("show transaction_isolation").fetchone()[0]
                    if not ro:
                        c.execute(f"update {t} set n = n + 1 where id = 1")
                    c.commit()
                    out[key] = [n, shown]
                except psycopg.Error as e:
                    c.rollback()
                    out[key] = err(e)
        c.isolation_level = None
        c.read_only = None
        out["final"] = c.execute(f"select n from {t} where id = 1").fetchone()[0]
        c.commit()
    return out


@scenario
def transaction_on_a_table_another_connection_just_created():
    """The first statement of a transaction reads a table created a moment ago on another
    connection: a replica that has not replayed it yet is not the answer."""
    out = {}
    for ro in [False, True]:
        t = f"fresh_{'ro_' if ro else ''}{SUF}"
        with connect() as a, connect(autocommit=False) as b:
            a.execute(f"create table {t} (id int)")
            b.read_only = ro
            try:
                out[f"read_only={ro}"] = b.execute(f"select count(*) from {t}").fetchone()[0]
                b.commit()
            except psycopg.Error as e:
                out[f"read_only={ro}"] = err(e)
    return out


@scenario
def errors_and_notices():
    out = {}
    with connect() as c:
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.sqlstate))
        for sql in ["select 1/0", "select * from no_such_table_x", "selec 1",
                    "do $$ begin raise notice 'hi'; end $$", "begin", "commit", "commit"]:
            try:
                c.execute(sql)
                out[sql] = "ok"
            except psycopg.Error as e:
                out[sql] = err(e)
        out["notices"] = notices
    return out


def main():
    results = {}
    for f in SCENARIOS:
        signal.alarm(TIMEOUT)
        try:
            results[f.__name__] = f()
        except BaseException as e:  # noqa: BLE001 - recorded, compared
            results[f.__name__] = err(e)
        finally:
            signal.alarm(0)
    print(json.dumps(results, default=str, sort_keys=True))


main()
