'use strict'
/*
 * Driver scenarios for node-postgres (pg, pg-pool, pg-cursor, pg-query-stream).
 *
 * crates/tidemark/tests/drivers.rs runs this program twice, once directly against the
 * PostgreSQL primary and once through tidemark, and compares the two JSON outputs: any
 * difference is a behaviour of the proxy that a node-postgres application would notice.
 *
 * Usage:  npm ci            (once, in this folder)
 *         node matrix.js HOST PORT USER DATABASE SUFFIX
 *
 * SUFFIX is appended to every table and channel name created here, so that the direct run
 * and the proxied run against the same cluster do not collide.
 *
 * Stdout gets exactly one JSON object {scenarioName: result}, keys sorted at every level.
 * A result is plain data (rows as arrays, counts, SQLSTATEs, ParameterStatus values, notice
 * codes, booleans instead of pids or timings), so it is the same for two runs against the
 * same server. An error is recorded as {"error": "<SQLSTATE or error class name>"}; each
 * scenario is bounded by TIMEOUT_MS and a hang is recorded as {"error": "timeout"}. The
 * program always exits 0 after printing; debugging output goes to stderr only.
 */

const pg = require('pg')
const Pool = require('pg-pool')
const Cursor = require('pg-cursor')
const QueryStream = require('pg-query-stream')

const [HOST, PORT, USER, DATABASE, SUFFIX] = process.argv.slice(2)
if (!SUFFIX) {
  process.stderr.write('usage: node matrix.js HOST PORT USER DATABASE SUFFIX\n')
  process.stdout.write('{}\n', () => process.exit(0))
  return
}
if (!/^[A-Za-z0-9_]+$/.test(SUFFIX)) {
  process.stderr.write('SUFFIX must match [A-Za-z0-9_]+\n')
}

const TIMEOUT_MS = 15000
const BASE = {
  host: HOST,
  port: Number(PORT),
  user: USER,
  database: DATABASE,
  connectionTimeoutMillis: 5000,
}

const log = (...a) => process.stderr.write(a.map(String).join(' ') + '\n')
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

process.on('uncaughtException', (e) => log('uncaughtException:', e && e.stack))
process.on('unhandledRejection', (e) => log('unhandledRejection:', e && e.stack))

class Timeout extends Error {}

function err(e) {
  if (e instanceof Timeout) return { error: 'timeout' }
  if (e instanceof pg.DatabaseError || (e && typeof e.code === 'string' && /^[0-9A-Z]{5}$/.test(e.code))) {
    return { error: e.code }
  }
  if (e && typeof e.code === 'string') return { error: e.code } // e.g. ECONNRESET
  return { error: (e && e.constructor && e.constructor.name) || String(e) }
}

// Runs fn, recording its error instead of throwing (for steps inside a scenario).
async function attempt(fn) {
  try {
    return await fn()
  } catch (e) {
    log('  step error:', e && e.message)
    return err(e)
  }
}

// Everything a scenario opens goes through its Ctx, so it can be closed (or torn down,
// after a timeout) without leaking into the next scenario.
class Ctx {
  constructor(name) {
    this.name = name
    this.clients = []
    this.pools = []
    this.dead = false
  }

  async client(extra = {}, beforeConnect) {
    if (this.dead) throw new Timeout()
    const c = new pg.Client({ ...BASE, ...extra })
    c.on('error', (e) => log(`[${this.name}] client error:`, e.message))
    this.clients.push(c)
    if (beforeConnect) beforeConnect(c)
    await c.connect()
    return c
  }

  pool(extra = {}) {
    if (this.dead) throw new Timeout()
    const p = new Pool({ Client: pg.Client, ...BASE, ...extra })
    p.on('error', (e) => log(`[${this.name}] pool error:`, e.message))
    this.pools.push(p)
    return p
  }

  async close(force) {
    this.dead = true
    const bounded = (p) => Promise.race([p.catch(() => {}), sleep(2000)])
    if (force) {
      // a hung scenario: cancel what its clients still run, so nothing lingers on the server
      const all = this.clients.concat(...this.pools.map((p) => p._clients || []))
      await Promise.all(all.filter((c) => c._activeQuery && c.processID).map((c) => bounded(cancel(c))))
    } else {
      await Promise.all(this.clients.map((c) => bounded(c.end())))
      await Promise.all(this.pools.map((p) => bounded(p.end())))
    }
    for (const c of this.clients) destroy(c)
    for (const p of this.pools) for (const c of p._clients || []) destroy(c)
  }
}

// Sends a CancelRequest for c's running query (over a new connection, as the protocol wants).
function cancel(c) {
  return new Promise((resolve) => {
    const con = new pg.Connection()
    con.on('error', () => resolve())
    con.on('end', () => resolve())
    con.on('connect', () => con.cancel(c.processID, c.secretKey))
    con.connect(BASE.port, BASE.host)
  })
}

function destroy(c) {
  try {
    if (c.connection && c.connection.stream) c.connection.stream.destroy()
  } catch (_) {}
}

const arr = (text, values) => ({ text, values, rowMode: 'array' })

function plain(v) {
  if (Buffer.isBuffer(v)) return '\\x' + v.toString('hex')
  if (v instanceof Date) return isNaN(v) ? 'Invalid Date' : v.toISOString()
  if (Array.isArray(v)) return v.map(plain)
  if (v && typeof v === 'object') {
    const o = {}
    for (const k of Object.keys(v)) o[k] = plain(v[k])
    return o
  }
  return v
}

function sorted(v) {
  if (Array.isArray(v)) return v.map(sorted)
  if (v && typeof v === 'object') {
    const o = {}
    for (const k of Object.keys(v).sort()) o[k] = sorted(v[k])
    return o
  }
  return v
}

const SCENARIOS = {}
const scenario = (fn) => {
  SCENARIOS[fn.name] = fn
}

// ---------------------------------------------------------------------------------------

scenario(async function simple_query_rows_and_types(ctx) {
  const c = await ctx.client()
  const r = await c.query(
    arr(
      "select 1::int4 as i4, 9007199254740993::int8 as i8, 1.5::float8 as f8, 1.25::numeric as num, " +
        "'héllo'::text as t, true as b, null::int as n, '2024-01-02'::date as d, " +
        "'2024-01-02 03:04:05+00'::timestamptz as tz, '{1,2,3}'::int4[] as ia, " +
        "'{\"a\": [1, 2]}'::jsonb as j, '\\x0102ff'::bytea as by, " +
        "'1 day 02:00:00'::interval as iv, '11111111-2222-3333-4444-555555555555'::uuid as u"
    )
  )
  const multi = await c.query('select 1 as a; select 2 as b, 3 as c')
  const empty = await c.query('select 1 where false')
  return {
    rows: plain(r.rows),
    fields: r.fields.map((f) => [f.name, f.dataTypeID]),
    command: r.command,
    rowCount: r.rowCount,
    multi: multi.map((m) => ({ command: m.command, rows: m.rows })),
    empty: { rowCount: empty.rowCount, fields: empty.fields.map((f) => f.name) },
  }
})

scenario(async function parameterized_query_extended(ctx) {
  const c = await ctx.client()
  const a = await c.query(arr('select $1::int + 1, $2::text, $3::int is null, $4::jsonb', [41, 'x', null, { k: 1 }]))
  const b = await c.query(arr('select $1::text || $1::text', ["it's"]))
  const many = []
  for (let i = 0; i < 5; i++) many.push((await c.query(arr('select $1::int * 10', [i]))).rows[0][0])
  const none = await c.query(arr('select $1::int where false', [1]))
  return { a: plain(a.rows), b: b.rows, many, none_rowCount: none.rowCount }
})

scenario(async function named_prepared_statement_reused(ctx) {
  const c = await ctx.client()
  const out = { double: [], concat: [] }
  for (let i = 0; i < 6; i++) {
    const r = await c.query({ name: `matrix_double`, text: 'select $1::int * 2', values: [i], rowMode: 'array' })
    out.double.push(r.rows[0][0])
    const s = await c.query({ name: `matrix_concat`, text: "select $1::text || '-' || $2::text", values: [`a${i}`, `b${i}`], rowMode: 'array' })
    out.concat.push(s.rows[0][0])
  }
  // a simple query and an unnamed one in between must not disturb the named statements
  await c.query('select 1')
  await c.query('select $1::int', [1])
  out.after_other = (await c.query({ name: 'matrix_double', text: 'select $1::int * 2', values: [50], rowMode: 'array' })).rows[0][0]
  out.server_side = (await c.query(arr("select count(*)::int from pg_prepared_statements where name in ('matrix_double', 'matrix_concat')"))).rows[0][0]
  return out
})

scenario(async function pool_read_your_writes(ctx) {
  const t = `node_ryw_${SUFFIX}`
  const pool = ctx.pool({ max: 4 })
  await pool.query(`create table ${t} (id int primary key, worker int, v text)`)
  const workers = 4
  const rounds = 20
  const results = await Promise.all(
    Array.from({ length: workers }, async (_, w) => {
      let seen = 0
      let ownClientSeen = 0
      for (let r = 0; r < rounds; r++) {
        const id = w * 1000 + r
        await pool.query(`insert into ${t} values ($1, $2, $3)`, [id, w, `w${w}r${r}`])
        const got = await pool.query(`select v from ${t} where id = $1`, [id])
        if (got.rows.length === 1 && got.rows[0].v === `w${w}r${r}`) seen++
        // same thing on one checked-out client
        const c = await pool.connect()
        try {
          await c.query(`insert into ${t} values ($1, $2, $3)`, [id + 500, w, 'own'])
          const g2 = await c.query(`select v from ${t} where id = $1`, [id + 500])
          if (g2.rows.length === 1) ownClientSeen++
        } finally {
          c.release()
        }
      }
      return { seen, ownClientSeen }
    })
  )
  const total = (await pool.query(`select count(*)::int as n from ${t}`)).rows[0].n
  return {
    workers,
    rounds,
    every_read_saw_its_row: results.every((x) => x.seen === rounds),
    every_own_client_read_saw_its_row: results.every((x) => x.ownClientSeen === rounds),
    seen_per_worker: results.map((x) => x.seen),
    own_client_seen_per_worker: results.map((x) => x.ownClientSeen),
    total_rows: total,
  }
})

scenario(async function pool_query_timeout_then_quick_queries(ctx) {
  const pool = ctx.pool({ max: 2, query_timeout: 300 })
  const out = {}
  const t0 = Date.now()
  try {
    await pool.query('select pg_sleep(2)')
    out.sleep = 'completed'
  } catch (e) {
    out.sleep = e.message === 'Query read timeout' ? 'query read timeout' : err(e)
  }
  out.sleep_abandoned_under_1s = Date.now() - t0 < 1000
  const quick = []
  for (let i = 0; i < 5; i++) {
    const s = Date.now()
    const r = await attempt(async () => (await pool.query(arr('select $1::int', [i]))).rows[0][0])
    quick.push({ value: r, under_1s: Date.now() - s < 1000 })
  }
  out.quick = quick
  // and concurrently, more than pool.max at once
  const conc = await Promise.all(
    [10, 11, 12, 13].map(async (i) => {
      const s = Date.now()
      const r = await attempt(async () => (await pool.query(arr('select $1::int', [i]))).rows[0][0])
      return { value: r, under_1s: Date.now() - s < 1000 }
    })
  )
  out.concurrent = conc
  return out
})

scenario(async function cursor_batches_of_10(ctx) {
  const c = await ctx.client()
  const cursor = c.query(new Cursor('select g, g * 2 from generate_series(1, 25) g', [], { rowMode: 'array' }))
  const batches = []
  for (let i = 0; i < 4; i++) batches.push(await cursor.read(10))
  await cursor.close()
  const after = (await c.query(arr('select 42'))).rows[0][0]
  // a cursor with parameters inside an explicit transaction
  await c.query('begin')
  const cur2 = c.query(new Cursor('select g from generate_series(1, $1::int) g', [7], { rowMode: 'array' }))
  const first = await cur2.read(3)
  const rest = await cur2.read(100)
  await cur2.close()
  await c.query('commit')
  return {
    batch_sizes: batches.map((b) => b.length),
    last_row: batches[2][batches[2].length - 1],
    first_row: batches[0][0],
    after_close: after,
    in_tx: { first: first.map((r) => r[0]), rest: rest.map((r) => r[0]) },
  }
})

scenario(async function query_stream_100_rows(ctx) {
  const c = await ctx.client()
  const stream = c.query(new QueryStream('select g from generate_series(1, $1::int) g', [100], { batchSize: 30 }))
  let count = 0
  let last = null
  for await (const row of stream) {
    count++
    last = row.g
  }
  const after = (await c.query(arr('select 7'))).rows[0][0]
  return { count, last, after }
})

scenario(async function transaction_commit_then_read(ctx) {
  const t = `node_tx_${SUFFIX}`
  const c = await ctx.client()
  await c.query(`create table ${t} (id int primary key, v text)`)
  const begin = await c.query('BEGIN')
  const ins = await c.query(`insert into ${t} values ($1, $2), ($3, $4)`, [1, 'one', 2, 'two'])
  const inside = (await c.query(arr(`select id, v from ${t} order by id`))).rows
  const commit = await c.query('COMMIT')
  const same = (await c.query(arr(`select id, v from ${t} order by id`))).rows
  // a new session that did not write: does it see the committed table and rows?
  const fromOther = await attempt(async () => {
    const other = await ctx.client()
    return (await other.query(arr(`select count(*)::int from ${t}`))).rows[0][0]
  })
  return {
    commands: [begin.command, ins.command, commit.command],
    inserted: ins.rowCount,
    inside,
    after_commit_same_client: same,
    after_commit_other_client: fromOther,
  }
})

scenario(async function failing_statement_in_transaction(ctx) {
  const t = `node_txfail_${SUFFIX}`
  const c = await ctx.client()
  await c.query(`create table ${t} (id int primary key)`)
  const out = {}
  await c.query('BEGIN')
  await c.query(`insert into ${t} values (1)`)
  out.failing = await attempt(() => c.query('select 1/0'))
  out.next_in_aborted = await attempt(() => c.query('select 1'))
  out.next_extended_in_aborted = await attempt(() => c.query('select $1::int', [1]))
  out.rollback = await attempt(async () => (await c.query('ROLLBACK')).command)
  out.count_after = (await c.query(arr(`select count(*)::int from ${t}`))).rows[0][0]
  out.select_after = (await c.query(arr('select 5'))).rows[0][0]
  // the same with an extended-protocol failure (unique violation)
  await c.query('BEGIN')
  await c.query(`insert into ${t} values ($1)`, [2])
  out.dup = await attempt(() => c.query(`insert into ${t} values ($1)`, [2]))
  out.rollback2 = await attempt(async () => (await c.query('ROLLBACK')).command)
  out.count_after2 = (await c.query(arr(`select count(*)::int from ${t}`))).rows[0][0]
  return out
})

scenario(async function error_codes(ctx) {
  const c = await ctx.client()
  const out = {}
  out.division_by_zero = await attempt(() => c.query('select 1/0'))
  out.missing_table = await attempt(() => c.query(`select * from node_no_such_table_${SUFFIX}`))
  out.syntax_error = await attempt(() => c.query('selec 1'))
  out.division_by_zero_extended = await attempt(() => c.query('select $1::int / 0', [1]))
  out.missing_table_extended = await attempt(() => c.query(`select * from node_no_such_table_${SUFFIX} where $1::int = 1`, [1]))
  out.bad_param = await attempt(() => c.query('select $1::int', ['not-an-int']))
  out.named_error = await attempt(() => c.query({ name: 'matrix_err', text: 'select 1/$1::int', values: [0] }))
  out.named_after_error = await attempt(async () => (await c.query({ name: 'matrix_err', text: 'select 1/$1::int', values: [1], rowMode: 'array' })).rows[0][0])
  out.still_usable = (await c.query(arr('select 1'))).rows[0][0]
  return out
})

scenario(async function notices_from_do_block(ctx) {
  const notices = []
  const c = await ctx.client()
  c.on('notice', (m) => notices.push({ code: m.code, severity: m.severity, message: m.message }))
  await c.query("do $$ begin raise notice 'first'; raise warning 'second'; raise notice using message = 'third', errcode = '01234'; end $$")
  const r1 = (await c.query(arr('select 1'))).rows[0][0]
  // a notice raised during an extended-protocol query
  await c.query(`create or replace function pg_temp.node_notice_fn(x int) returns int language plpgsql as $$ begin raise notice 'fn %', x; return x; end $$`)
  const r2 = (await c.query(arr('select pg_temp.node_notice_fn($1)', [3]))).rows[0][0]
  await sleep(100)
  return { notices, results: [r1, r2] }
})

scenario(async function listen_notify_self_and_other(ctx) {
  const ch = `node_ch_${SUFFIX}`
  const listener = await ctx.client()
  const other = await ctx.client()
  const got = []
  listener.on('notification', (m) => got.push(m))
  const listen = await listener.query(`LISTEN ${ch}`)
  await listener.query(`NOTIFY ${ch}, 'from-self'`)
  await other.query(`NOTIFY ${ch}, 'from-other'`)
  await other.query('select pg_notify($1, $2)', [ch, 'from-other-extended'])
  const deadline = Date.now() + 3000
  while (got.length < 3 && Date.now() < deadline) await sleep(50)
  // after UNLISTEN nothing more may arrive
  const unlisten = await listener.query(`UNLISTEN ${ch}`)
  await other.query(`NOTIFY ${ch}, 'after-unlisten'`)
  await listener.query('select 1')
  await sleep(300)
  const items = got
    .map((m) => ({
      channel_matches: m.channel === ch,
      payload: m.payload,
      pid_is_listener: m.processId === listener.processID,
      pid_is_other: m.processId === other.processID,
    }))
    .sort((a, b) => (a.payload < b.payload ? -1 : a.payload > b.payload ? 1 : 0))
  return { listen: listen.command, unlisten: unlisten.command, received: items }
})

scenario(async function process_id_matches_backend_pid(ctx) {
  const c = await ctx.client()
  const simple = (await c.query(arr('select pg_backend_pid()'))).rows[0][0]
  const ext = (await c.query(arr('select pg_backend_pid() + $1::int', [0]))).rows[0][0]
  await c.query('begin')
  const inTx = (await c.query(arr('select pg_backend_pid()'))).rows[0][0]
  await c.query('commit')
  return {
    has_process_id: typeof c.processID === 'number' && c.processID > 0,
    has_secret_key: c.secretKey !== null && c.secretKey !== undefined,
    simple_equals: simple === c.processID,
    extended_equals: ext === c.processID,
    in_transaction_equals: inTx === c.processID,
  }
})

const PARAMS = [
  'application_name', 'client_encoding', 'DateStyle', 'default_transaction_read_only',
  'in_hot_standby', 'integer_datetimes', 'IntervalStyle', 'is_superuser', 'server_encoding',
  'session_authorization', 'standard_conforming_strings', 'TimeZone',
]

scenario(async function application_name_echoed(ctx) {
  const statuses = {}
  const c = await ctx.client({ application_name: 'matrix-node-app' }, (cl) =>
    cl.connection.on('parameterStatus', (m) => {
      statuses[m.parameterName] = m.parameterValue
    })
  )
  const out = {}
  out.current_setting = (await c.query(arr("select current_setting('application_name')"))).rows[0][0]
  out.extended = (await c.query(arr('select current_setting($1)', ['application_name']))).rows[0][0]
  out.parameter_status_at_startup = Object.fromEntries(PARAMS.map((k) => [k, statuses[k] === undefined ? null : statuses[k]]))
  await c.query("SET application_name = 'matrix-node-changed'")
  out.parameter_status_after_set = statuses.application_name
  out.after_set = (await c.query(arr("select current_setting('application_name')"))).rows[0][0]
  const fb = await ctx.client({ fallback_application_name: 'matrix-node-fallback' })
  out.fallback = (await fb.query(arr("select current_setting('application_name')"))).rows[0][0]
  const none = await ctx.client()
  out.default = (await none.query(arr("select current_setting('application_name')"))).rows[0][0]
  return out
})

// ---------------------------------------------------------------------------------------

async function runOne(name, fn) {
  const ctx = new Ctx(name)
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Timeout()), TIMEOUT_MS)
  })
  let result
  let timedOut = false
  try {
    result = plain(await Promise.race([fn(ctx), timeout]))
  } catch (e) {
    timedOut = e instanceof Timeout
    log(`[${name}] failed:`, e && (e.stack || e.message || e))
    result = err(e)
  } finally {
    clearTimeout(timer)
  }
  await ctx.close(timedOut)
  return result
}

async function main() {
  const results = {}
  for (const [name, fn] of Object.entries(SCENARIOS)) {
    log(`running ${name}`)
    results[name] = await runOne(name, fn)
  }
  return results
}

main()
  .catch((e) => {
    log('main failed:', e && e.stack)
    return { _main: err(e) }
  })
  .then((results) => {
    process.stdout.write(JSON.stringify(sorted(results)) + '\n', () => process.exit(0))
  })
