//! Differential test of optimistic transactions (`routing.transactions = optimistic`, issue
//! 22): random transactions from a small vocabulary run twice, once through tidemark on one
//! copy of the data (tables `a_*`) and once on a direct connection to the primary on an
//! identical copy (`b_*`). Every answer is compared message by message (row descriptions'
//! column names and types, data rows, command tags, SQLSTATEs of errors and notices, the
//! protocol's acknowledgements, ReadyForQuery's transaction status), then the tables' contents.
//!
//! Rounds run one after the other: the tidemark side first, then the direct side. In some
//! rounds ("change rounds") a concurrent writer changes a row of both copies (on the primary,
//! in one implicit transaction) after the tidemark transaction's reads and before its first
//! write; the direct side runs entirely after the change. The tidemark transaction read on the
//! replica before the change, so its reads agree with the direct side's exactly when the change
//! touched nothing it read: then tidemark must replay it on the primary and go on (identical
//! answers); otherwise it must refuse the write with 40001 (and the direct side's transaction
//! is rolled back too, so the two copies stay comparable). Everywhere else, any difference and
//! any 40001 is a failure.
//!
//! Left out of the vocabulary, as answers that differ by nature (docs/routing.md, "What the
//! hash cannot see"; docs/compatibility.md): `now()` and the other functions that name the
//! server or its clock. (`SHOW transaction_read_only` is in: tidemark sends it to the primary,
//! which moves the transaction there, so it answers `off` as directly.) `SERIALIZABLE`
//! (runs on the primary in every mode). After a 40001 the client is in a failed transaction
//! that has no server: only its end is compared with PostgreSQL's (`COMMIT` answers
//! `ROLLBACK`), every statement before it must answer 25P02.
//!
//! `DIFF_SEED=<n>` replays another seed; `DIFF_ROUNDS=<n>` changes the number of rounds.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::raw::{sqlstate, Msg, Raw};
use common::*;
use postgres_protocol::message::frontend;
use tidemark::config::TxMode;

/// A small apply delay: the replica runs a little behind, so a change made on the primary
/// right before a transaction's write is one its replica reads did not see.
const DELAY: Duration = Duration::from_millis(30);
const ACCOUNTS: u64 = 12;
const DEFAULT_SEED: u64 = 0x7469_6465_2022;
const DEFAULT_ROUNDS: usize = 150;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn account(&mut self) -> u64 {
        1 + self.below(ACCOUNTS)
    }
}

/// One unit a client sends. SQL texts name tables as `{t}_…`, replaced by `a` or `b`.
#[derive(Clone, Debug)]
enum Op {
    /// A simple query.
    Simple(String),
    /// Parse of a named statement, Describe of it, Sync.
    Prepare { name: String, sql: String },
    /// Bind of a named statement (text parameters), Execute, Sync.
    Exec { name: String, params: Vec<String> },
    /// Parse of the unnamed statement, Bind, Describe of the portal, Execute, Sync.
    Unnamed { sql: String, params: Vec<String> },
    /// Close of a named statement, Sync.
    Close { name: String },
    /// Bind of the unnamed statement parsed by an earlier unit, Execute, Sync.
    BindUnnamed { params: Vec<String> },
    /// Parse of the unnamed statement, Bind to a named portal, Execute of `rows` rows, Sync
    /// (the portal stays open until the transaction ends).
    OpenPortal {
        portal: String,
        sql: String,
        rows: i32,
    },
    /// Execute of `rows` more rows of an open portal, Sync.
    FetchPortal { portal: String, rows: i32 },
    /// Parse/Bind/Describe/Execute of each statement (unnamed, no parameters), one Sync: one
    /// unit.
    Batch(Vec<String>),
    /// Several units sent at once, before reading any answer (a pipeline).
    Pipeline(Vec<Op>),
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    /// Not a read for tidemark: the transaction moves to the primary here.
    writes: bool,
}

fn read(sql: impl Into<String>) -> Step {
    Step {
        op: Op::Simple(sql.into()),
        writes: false,
    }
}

fn write(sql: impl Into<String>) -> Step {
    Step {
        op: Op::Simple(sql.into()),
        writes: true,
    }
}

fn op_step(op: Op, writes: bool) -> Step {
    Step { op, writes }
}

/// A generated transaction.
struct Tx {
    steps: Vec<Step>,
    /// A change round: the account the concurrent writer changes before the first write.
    change: Option<u64>,
}

/// The statements of the read phase (one item: one or more steps). `allow_abort`: may fail
/// the transaction (an error without a savepoint); `failed`: it is failed already. Whether
/// this item failed it.
fn read_item(
    rng: &mut Rng,
    round: usize,
    j: usize,
    allow_abort: bool,
    failed: bool,
    steps: &mut Vec<Step>,
) -> bool {
    let k = rng.account();
    let mut pick = rng.below(if allow_abort { 21 } else { 20 });
    if pick == 20 {
        // The abort comes last in the list.
        pick = 99;
    }
    if failed && matches!(pick, 6 | 17) {
        // In a failed transaction PostgreSQL refuses a Parse (25P02) and has no statement
        // afterwards (a later Bind of it gets 26000; the unnamed one is dropped too); tidemark's
        // session records the statement when the Parse comes and parses it again before the
        // Bind (25P02 again). Not an optimistic transaction's difference (any failed
        // transaction through tidemark has it): left out.
        pick = 16;
    }
    match pick {
        0 => steps.push(read("SELECT id, v, note FROM {t}_accounts ORDER BY id")),
        1 => steps.push(read(format!(
            "SELECT id, v FROM {{t}}_accounts WHERE id = {k}"
        ))),
        2 => steps.push(read(
            "SELECT count(*), sum(v), max(v), min(note) FROM {t}_accounts",
        )),
        3 => steps.push(read(
            "SELECT account_id, sum(amount), count(*) FROM {t}_ledger GROUP BY account_id ORDER BY account_id",
        )),
        4 => steps.push(op_step(
            Op::Exec {
                name: "by_id".into(),
                params: vec![k.to_string()],
            },
            false,
        )),
        5 => steps.push(op_step(
            Op::Unnamed {
                sql: "SELECT id, v FROM {t}_accounts WHERE v >= $1 ORDER BY id LIMIT 5".into(),
                params: vec![(rng.below(30) as i64 - 5).to_string()],
            },
            false,
        )),
        6 => {
            // A statement prepared inside the transaction, run once or twice, maybe closed.
            let name = format!("q{round}_{j}");
            steps.push(op_step(
                Op::Prepare {
                    name: name.clone(),
                    sql: "SELECT count(*), coalesce(sum(amount), 0) FROM {t}_ledger WHERE account_id = $1"
                        .into(),
                },
                false,
            ));
            for _ in 0..1 + rng.below(2) {
                steps.push(op_step(
                    Op::Exec {
                        name: name.clone(),
                        params: vec![rng.account().to_string()],
                    },
                    false,
                ));
            }
            if rng.chance(50) {
                steps.push(op_step(Op::Close { name }, false));
            }
        }
        7 => steps.push(read(format!(
            "SELECT 1 AS one; SELECT v FROM {{t}}_accounts WHERE id = {k}"
        ))),
        8 => {
            steps.push(read(format!(
                "SET LOCAL statement_timeout = '{}s'",
                1 + rng.below(9)
            )));
            steps.push(read("SHOW statement_timeout"));
        }
        9 => {
            steps.push(read(format!("SET LOCAL work_mem = '{}MB'", 4 + rng.below(8))));
            steps.push(read("SHOW work_mem"));
        }
        10 => steps.push(read("SHOW transaction_isolation")),
        11 => {
            steps.push(read(format!("SAVEPOINT s{j}")));
            steps.push(read(format!(
                "SELECT v, note FROM {{t}}_accounts WHERE id BETWEEN {k} AND {} ORDER BY id",
                k + 3
            )));
            steps.push(read(if rng.chance(50) {
                format!("RELEASE SAVEPOINT s{j}")
            } else {
                format!("ROLLBACK TO SAVEPOINT s{j}")
            }));
        }
        12 => {
            // An error, rolled back to a savepoint.
            steps.push(read(format!("SAVEPOINT e{j}")));
            steps.push(read(format!(
                "SELECT 1 / (v - v) FROM {{t}}_accounts WHERE id = {k}"
            )));
            if rng.chance(30) {
                // In the failed transaction: 25P02.
                steps.push(read("SELECT count(*) FROM {t}_accounts"));
            }
            steps.push(read(format!("ROLLBACK TO SAVEPOINT e{j}")));
        }
        13 => {
            steps.push(read(format!("SAVEPOINT c{j}")));
            steps.push(read("SELECT missing_column FROM {t}_accounts"));
            steps.push(read(format!("ROLLBACK TO SAVEPOINT c{j}")));
        }
        14 => steps.push(op_step(
            Op::Unnamed {
                sql: "SELECT id, note FROM {t}_accounts WHERE id = $1 OR id = $2 ORDER BY id"
                    .into(),
                params: vec![k.to_string(), rng.account().to_string()],
            },
            false,
        )),
        15 => {
            // A redundant BEGIN: WARNING 25001, the transaction goes on (answered by
            // tidemark when it is the first statement).
            steps.push(read(if rng.chance(50) {
                "BEGIN"
            } else {
                "START TRANSACTION"
            }));
        }
        16 => steps.push(read(format!(
            "SELECT count(*) FROM {{t}}_ledger WHERE account_id = {k}"
        ))),
        19 => {
            // Two reads in one extended-protocol unit, or two units pipelined.
            let one = format!("SELECT v FROM {{t}}_accounts WHERE id = {k}");
            let two = "SELECT count(*) FROM {t}_ledger".to_string();
            steps.push(op_step(
                if rng.chance(50) {
                    Op::Batch(vec![one, two])
                } else {
                    Op::Pipeline(vec![
                        Op::Simple(one),
                        Op::Unnamed {
                            sql: two,
                            params: vec![],
                        },
                    ])
                },
                false,
            ));
        }
        17 => {
            // The unnamed statement, bound again by a later unit.
            steps.push(op_step(
                Op::Unnamed {
                    sql: "SELECT id, v FROM {t}_accounts WHERE id <= $1 ORDER BY id DESC".into(),
                    params: vec![k.to_string()],
                },
                false,
            ));
            steps.push(op_step(
                Op::BindUnnamed {
                    params: vec![rng.account().to_string()],
                },
                false,
            ));
        }
        18 => {
            // A portal read a few rows at a time, across units.
            let portal = format!("p{j}");
            steps.push(op_step(
                Op::OpenPortal {
                    portal: portal.clone(),
                    sql: "SELECT id, v FROM {t}_accounts WHERE id >= $1 ORDER BY id".into(),
                    rows: 2,
                },
                false,
            ));
            for _ in 0..1 + rng.below(2) {
                steps.push(op_step(
                    Op::FetchPortal {
                        portal: portal.clone(),
                        rows: 1 + rng.below(3) as i32,
                    },
                    false,
                ));
            }
        }
        _ => {
            // An error without a savepoint: the transaction is failed; what follows
            // answers 25P02 and its COMMIT answers ROLLBACK.
            steps.push(read("SELECT 1 / 0"));
            return true;
        }
    }
    false
}

/// One write (one or more steps; only the write itself `writes`). `failed`: the transaction
/// is failed already (no prepared statement then: see `read_item`); `first_of_change`: the
/// first write of a change round.
fn write_item(
    rng: &mut Rng,
    round: usize,
    j: usize,
    failed: bool,
    first_of_change: bool,
    steps: &mut Vec<Step>,
) {
    let k = rng.account();
    let amt = 1 + rng.below(50);
    let mut pick = rng.below(11);
    if failed && pick == 6 {
        pick = 0;
    }
    if first_of_change && pick == 10 {
        // Its first unit, a read, would run on the replica after the change (the move comes
        // at the second): the change round's reads must all come before the change.
        pick = 9;
    }
    match pick {
        0 => steps.push(write(format!(
            "UPDATE {{t}}_accounts SET v = v + 1 WHERE id = {k}"
        ))),
        9 => {
            // A read and the write in one extended-protocol unit.
            steps.push(op_step(
                Op::Batch(vec![
                    format!("SELECT v FROM {{t}}_accounts WHERE id = {k}"),
                    format!("UPDATE {{t}}_accounts SET v = v + 3 WHERE id = {k} RETURNING v"),
                ]),
                true,
            ));
        }
        10 => {
            // The write pipelined behind a read: both sent before any answer.
            steps.push(op_step(
                Op::Pipeline(vec![
                    Op::Simple(format!("SELECT id, v FROM {{t}}_accounts WHERE id = {k}")),
                    Op::Unnamed {
                        sql: "UPDATE {t}_accounts SET v = v + $1 WHERE id = $2".into(),
                        params: vec![amt.to_string(), k.to_string()],
                    },
                    Op::Simple("SELECT count(*), sum(v) FROM {t}_accounts".into()),
                ]),
                true,
            ));
        }
        8 => {
            // Answered differently by a standby: tidemark sends it to the primary, which
            // moves the transaction there (it answers `off`, as directly).
            steps.push(write("SHOW transaction_read_only"));
            steps.push(write(format!(
                "UPDATE {{t}}_accounts SET v = v + 2 WHERE id = {k}"
            )));
        }
        1 => steps.push(write(format!(
            "INSERT INTO {{t}}_ledger (id, account_id, amount) SELECT coalesce(max(id), 0) + 1, {k}, {amt} FROM {{t}}_ledger RETURNING id, amount"
        ))),
        2 => steps.push(op_step(
            Op::Unnamed {
                sql: "UPDATE {t}_accounts SET v = v + $1 WHERE id = $2".into(),
                params: vec![amt.to_string(), k.to_string()],
            },
            true,
        )),
        3 => steps.push(write(
            "DELETE FROM {t}_ledger WHERE id = (SELECT min(id) FROM {t}_ledger)",
        )),
        4 => steps.push(write(format!(
            "UPDATE {{t}}_accounts SET note = 'r{round}' WHERE id = {k} RETURNING v"
        ))),
        5 => {
            // A write that fails (unique violation), rolled back to a savepoint.
            steps.push(read(format!("SAVEPOINT w{j}")));
            steps.push(write(format!(
                "INSERT INTO {{t}}_accounts (id, v) VALUES ({k}, 0)"
            )));
            steps.push(read(format!("ROLLBACK TO SAVEPOINT w{j}")));
        }
        6 => {
            // A write prepared inside the transaction (its Parse already moves it).
            let name = format!("w{round}_{j}");
            steps.push(op_step(
                Op::Prepare {
                    name: name.clone(),
                    sql: "UPDATE {t}_accounts SET v = v - $1 WHERE id = $2 RETURNING id, v".into(),
                },
                true,
            ));
            steps.push(op_step(
                Op::Exec {
                    name,
                    params: vec![amt.to_string(), k.to_string()],
                },
                true,
            ));
        }
        _ => steps.push(write(format!(
            "UPDATE {{t}}_accounts SET v = v + 1 WHERE id = {k}; UPDATE {{t}}_accounts SET v = v - 1 WHERE id = {}",
            rng.account()
        ))),
    }
}

fn generate(rng: &mut Rng, round: usize, change_round: bool) -> Tx {
    let mut steps = Vec::new();
    let extended = rng.chance(20);
    let begin = match rng.below(10) {
        0..=4 => "BEGIN",
        5 => "START TRANSACTION",
        6 => "BEGIN ISOLATION LEVEL READ COMMITTED",
        _ => "BEGIN ISOLATION LEVEL REPEATABLE READ",
    };
    steps.push(if extended {
        op_step(
            Op::Unnamed {
                sql: begin.into(),
                params: vec![],
            },
            false,
        )
    } else {
        read(begin)
    });
    let mut change = None;
    if change_round {
        // A new shape every change round (learning never starts it on the primary), reading
        // the row the writer changes in half of the rounds.
        let k = rng.account();
        steps.push(read(format!(
            "SELECT id, v AS v_r{round} FROM {{t}}_accounts WHERE id = {k}"
        )));
        change = Some(if rng.chance(50) { k } else { rng.account() });
    }
    let reads = if change_round || rng.chance(90) {
        1 + rng.below(4)
    } else {
        0
    };
    let mut failed = false;
    for j in 0..reads as usize {
        // No unsavepointed error in change rounds: a failed transaction does not move, and
        // its reads (before the change) would differ from the direct side's (after it).
        failed |= read_item(rng, round, j, !change_round, failed, &mut steps);
    }
    if change_round || rng.chance(50) {
        for j in 0..1 + rng.below(2) as usize {
            write_item(
                rng,
                round,
                10 + j,
                failed,
                change_round && j == 0,
                &mut steps,
            );
        }
        if rng.chance(40) {
            read_item(rng, round, 20, false, failed, &mut steps);
        }
    }
    let end = if rng.chance(75) { "COMMIT" } else { "ROLLBACK" };
    steps.push(if rng.chance(20) {
        op_step(
            Op::Unnamed {
                sql: end.into(),
                params: vec![],
            },
            false,
        )
    } else {
        read(end)
    });
    Tx { steps, change }
}

fn text_params(params: &[String], buf: &mut BytesMut, portal: &str, stmt: &str) {
    frontend::bind(
        portal,
        stmt,
        Some(0),
        params.iter(),
        |p, b| -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            b.extend_from_slice(p.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        Some(0),
        buf,
    )
    .map_err(|_| ())
    .expect("bind");
}

/// The units `op` sends; how many ReadyForQuery answer them.
fn encode(op: &Op, t: &str, b: &mut BytesMut) -> usize {
    let sql = |s: &str| s.replace("{t}", t);
    match op {
        Op::Simple(s) => frontend::query(&sql(s), b).expect("query"),
        Op::Prepare { name, sql: s } => {
            frontend::parse(name, &sql(s), std::iter::empty(), b).expect("parse");
            frontend::describe(b'S', name, b).expect("describe");
            frontend::sync(b);
        }
        Op::Exec { name, params } => {
            text_params(params, b, "", name);
            frontend::execute("", 0, b).expect("execute");
            frontend::sync(b);
        }
        Op::Unnamed { sql: s, params } => {
            frontend::parse("", &sql(s), std::iter::empty(), b).expect("parse");
            text_params(params, b, "", "");
            frontend::describe(b'P', "", b).expect("describe");
            frontend::execute("", 0, b).expect("execute");
            frontend::sync(b);
        }
        Op::Close { name } => {
            frontend::close(b'S', name, b).expect("close");
            frontend::sync(b);
        }
        Op::BindUnnamed { params } => {
            text_params(params, b, "", "");
            frontend::execute("", 0, b).expect("execute");
            frontend::sync(b);
        }
        Op::OpenPortal {
            portal,
            sql: s,
            rows,
        } => {
            frontend::parse("", &sql(s), std::iter::empty(), b).expect("parse");
            text_params(&["3".to_string()], b, portal, "");
            frontend::describe(b'P', portal, b).expect("describe");
            frontend::execute(portal, *rows, b).expect("execute");
            frontend::sync(b);
        }
        Op::FetchPortal { portal, rows } => {
            frontend::execute(portal, *rows, b).expect("execute");
            frontend::sync(b);
        }
        Op::Batch(stmts) => {
            for st in stmts {
                common::raw::unnamed_statement(&sql(st), true, b);
            }
            frontend::sync(b);
        }
        Op::Pipeline(ops) => return ops.iter().map(|o| encode(o, t, b)).sum(),
    }
    1
}

/// Sends `op` for table set `t` and reads its answer up to its (last) ReadyForQuery.
async fn send(r: &mut Raw, op: &Op, t: &str) -> Vec<Msg> {
    let mut b = BytesMut::new();
    let units = encode(op, t, &mut b);
    r.send(&b).await;
    let mut msgs = Vec::new();
    for _ in 0..units {
        let m = tokio::time::timeout(Duration::from_secs(20), r.until_ready())
            .await
            .unwrap_or_else(|_| panic!("no answer within 20 s to {op:?} ({t})"));
        assert!(
            m.last().is_some_and(|m| m.0 == b'Z'),
            "the connection closed during {op:?} ({t}): {m:?}"
        );
        msgs.extend(m);
    }
    msgs
}

fn cstr(b: &[u8], i: &mut usize) -> String {
    let end = b[*i..]
        .iter()
        .position(|&c| c == 0)
        .map_or(b.len(), |p| *i + p);
    let s = String::from_utf8_lossy(&b[*i..end]).into_owned();
    *i = end + 1;
    s
}

/// An answer as compared: what a client sees, without what names the table set or the server
/// (table OIDs, error messages, parameter reports).
fn norm(msgs: &[Msg]) -> Vec<String> {
    let mut out = Vec::new();
    for (tag, body) in msgs {
        match tag {
            b'T' => {
                let n = i16::from_be_bytes([body[0], body[1]]);
                let mut i = 2;
                let mut cols = Vec::new();
                for _ in 0..n {
                    let name = cstr(body, &mut i);
                    let typ = &body[i + 6..i + 10];
                    let fmt = &body[i + 16..i + 18];
                    cols.push(format!("{name}:{typ:?}:{fmt:?}"));
                    i += 18;
                }
                out.push(format!("T {}", cols.join(",")));
            }
            b'D' => {
                let rows = common::raw::data_rows(&[(b'D', body.clone())]);
                out.push(format!("D {:?}", rows[0]));
            }
            b'C' => out.push(format!(
                "C {}",
                String::from_utf8_lossy(body).trim_end_matches('\0')
            )),
            b'E' => out.push(format!("E {}", sqlstate(body))),
            b'N' => out.push(format!("N {}", sqlstate(body))),
            b'Z' => out.push(format!("Z {}", body[0] as char)),
            b't' => out.push(format!("t {body:?}")),
            b'1' | b'2' | b'3' | b'n' | b's' | b'I' => out.push((*tag as char).to_string()),
            // ParameterStatus, BackendKeyData, notifications: not answers.
            _ => {}
        }
    }
    out
}

/// The message of the first ErrorResponse of an answer (for reports).
fn error_message(msgs: &[Msg]) -> String {
    msgs.iter()
        .find(|m| m.0 == b'E')
        .map(|m| common::raw::field(&m.1, b'M'))
        .unwrap_or_default()
}

fn has_code(ans: &[String], code: &str) -> bool {
    ans.iter().any(|a| *a == format!("E {code}"))
}

async fn table_contents(c: &tokio_postgres::Client, t: &str) -> Vec<Vec<Option<String>>> {
    let mut all = rows(
        &c.simple_query(&format!("SELECT id, v, note FROM {t}_accounts ORDER BY id"))
            .await
            .expect("read accounts"),
    );
    all.push(vec![Some("--".into())]);
    all.extend(rows(
        &c.simple_query(&format!(
            "SELECT id, account_id, amount FROM {t}_ledger ORDER BY id"
        ))
        .await
        .expect("read ledger"),
    ));
    all
}

async fn caught_up(env: &Env) {
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    wait_view_caught_up(&env.proxy).await;
}

const PRIMARY_OUTCOMES: [&str; 5] = [
    "primary_declared",
    "primary_learned",
    "primary_level",
    "primary_write",
    "primary_routed",
];
const OUTCOMES: [&str; 8] = [
    "replica",
    "replayed",
    "diverged",
    "primary_declared",
    "primary_learned",
    "primary_level",
    "primary_write",
    "primary_routed",
];

fn show_tx(tx: &Tx) -> String {
    tx.steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "  {i}: {:?}{}",
                s.op,
                if s.writes { " [writes]" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_transactions_answer_like_a_direct_connection() {
    let seed = std::env::var("DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let rounds = std::env::var("DIFF_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    println!("optimistic differential test: seed {seed} (DIFF_SEED), {rounds} rounds");
    // splitmix64 of the seed: nearby seeds give unrelated sequences (xorshift needs a
    // non-zero state).
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut rng = Rng((z ^ (z >> 31)) | 1);

    let env = start(&[Some(DELAY)], |c| {
        c.routing.transactions = TxMode::Optimistic;
    })
    .await;
    let control = env.node(0).await;
    for t in ["a", "b"] {
        exec(
            &control,
            &format!(
                "CREATE TABLE {t}_accounts (id int PRIMARY KEY, v int NOT NULL, note text);
                 INSERT INTO {t}_accounts SELECT g, g * 10, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, {ACCOUNTS}) g;
                 CREATE TABLE {t}_ledger (id int PRIMARY KEY, account_id int NOT NULL, amount int NOT NULL);
                 INSERT INTO {t}_ledger SELECT g, 1 + g % {ACCOUNTS}, g FROM generate_series(1, 5) g"
            ),
        )
        .await;
    }
    caught_up(&env).await;
    let primary_addr: SocketAddr = format!("127.0.0.1:{}", env.cluster.port(0))
        .parse()
        .unwrap();
    let mut a = Raw::connect(env.proxy.addr, "postgres").await;
    let mut b = Raw::connect(primary_addr, "postgres").await;
    // A statement prepared outside any transaction, used inside them.
    let by_id = Op::Prepare {
        name: "by_id".into(),
        sql: "SELECT id, v, note FROM {t}_accounts WHERE id = $1".into(),
    };
    let (pa, pb) = (
        send(&mut a, &by_id, "a").await,
        send(&mut b, &by_id, "b").await,
    );
    assert_eq!(norm(&pa), norm(&pb));

    // Found by this test: a deferred `START TRANSACTION` was answered with the tag `BEGIN`
    // (PostgreSQL: `START TRANSACTION`, also for a redundant one, with WARNING 25001).
    for steps in [
        [
            "START TRANSACTION",
            "START TRANSACTION",
            "SELECT count(*) FROM {t}_accounts",
            "COMMIT",
        ],
        [
            "START TRANSACTION",
            "SELECT count(*) FROM {t}_accounts",
            "BEGIN",
            "ROLLBACK",
        ],
    ] {
        for sql in steps {
            let op = Op::Simple(sql.into());
            let (x, y) = (send(&mut a, &op, "a").await, send(&mut b, &op, "b").await);
            assert_eq!(norm(&x), norm(&y), "{sql} in {steps:?}");
        }
    }

    let start_counts = env.proxy.app.transactions.counts();
    let (mut change_rounds, mut refused, mut change_replayed, mut skipped_changes) = (0, 0, 0, 0);
    for round in 0..rounds {
        let change_round = round % 5 == 2;
        let tx = generate(&mut rng, round, change_round);
        if change_round || rng.chance(50) {
            caught_up(&env).await;
        }
        let first_write = tx.steps.iter().position(|s| s.writes);
        let before = env.proxy.app.transactions.counts();

        // Through tidemark, on the a_ tables.
        let mut a_msgs = Vec::new();
        let mut changed = false;
        for (i, s) in tx.steps.iter().enumerate() {
            if let (Some(k), Some(w)) = (tx.change, first_write) {
                if i == w {
                    let now = env.proxy.app.transactions.counts();
                    let on_primary: u64 = PRIMARY_OUTCOMES
                        .iter()
                        .map(|o| now.get(o) - before.get(o))
                        .sum();
                    if on_primary == 0 {
                        exec(
                            &control,
                            &format!(
                                "UPDATE a_accounts SET v = v + 100 WHERE id = {k}; UPDATE b_accounts SET v = v + 100 WHERE id = {k}"
                            ),
                        )
                        .await;
                        changed = true;
                    } else {
                        // Its first read went to the primary (not caught up in time): the
                        // change would be an ordinary concurrent write, not this test's case.
                        skipped_changes += 1;
                    }
                }
            }
            a_msgs.push(send(&mut a, &s.op, "a").await);
        }
        let after = env.proxy.app.transactions.counts();
        let delta = |o: &str| after.get(o) - before.get(o);
        let a_ans: Vec<Vec<String>> = a_msgs.iter().map(|m| norm(m)).collect();
        let refused_at = a_ans.iter().position(|x| has_code(x, "40001"));

        // Directly on the primary, on the b_ tables: the same steps; up to the refused one
        // (then rolled back) when tidemark refused the transaction.
        let mut b_ans = Vec::new();
        for s in &tx.steps[..refused_at.unwrap_or(tx.steps.len())] {
            b_ans.push(norm(&send(&mut b, &s.op, "b").await));
        }
        if refused_at.is_some() {
            let m = norm(&send(&mut b, &Op::Simple("ROLLBACK".into()), "b").await);
            assert_eq!(m.last().map(String::as_str), Some("Z I"), "{m:?}");
        }

        let report = |what: &str| -> String {
            let mut s = format!(
                "seed {seed}, round {round} (change {:?}, changed {changed}): {what}\n{}\n",
                tx.change,
                show_tx(&tx)
            );
            for (i, x) in a_ans.iter().enumerate() {
                s.push_str(&format!(
                    "  tidemark {i}: {x:?} {}\n  direct   {i}: {:?}\n",
                    error_message(&a_msgs[i]),
                    b_ans.get(i)
                ));
            }
            s.push_str(&format!(
                "  outcomes: {:?}",
                OUTCOMES
                    .iter()
                    .map(|o| (o, delta(o)))
                    .filter(|(_, n)| *n > 0)
                    .collect::<Vec<_>>()
            ));
            s
        };

        match refused_at {
            None => {
                assert_eq!(a_ans, b_ans, "{}", report("the answers differ"));
                assert_eq!(delta("diverged"), 0, "{}", report("diverged, no 40001"));
                if changed {
                    change_rounds += 1;
                    change_replayed += 1;
                    assert_eq!(
                        delta("replayed"),
                        1,
                        "{}",
                        report("a change round that went on was not replayed")
                    );
                }
            }
            Some(f) => {
                assert!(changed, "{}", report("40001 without a concurrent change"));
                change_rounds += 1;
                refused += 1;
                assert_eq!(
                    Some(f),
                    first_write,
                    "{}",
                    report("40001 elsewhere than at the first write")
                );
                assert_eq!(delta("diverged"), 1, "{}", report("40001 not counted"));
                assert_ne!(
                    a_ans[..f],
                    b_ans[..f],
                    "{}",
                    report("40001 though the replica's answers were the primary's")
                );
                // In the failed transaction: 25P02 until its end, which answers ROLLBACK.
                let (end, rest) = a_ans[f + 1..].split_last().expect("an end");
                for x in rest {
                    assert!(
                        has_code(x, "25P02") && x.last().map(String::as_str) == Some("Z E"),
                        "{}",
                        report("not 25P02 after the 40001")
                    );
                }
                assert!(
                    end.iter().any(|m| m == "C ROLLBACK")
                        && end.last().map(String::as_str) == Some("Z I"),
                    "{}",
                    report("the failed transaction's end")
                );
            }
        }
        // Nothing of a transaction's SET LOCAL stays; both copies hold the same rows.
        for q in ["SHOW statement_timeout", "SHOW work_mem"] {
            let x = norm(&send(&mut a, &Op::Simple(q.into()), "a").await);
            let y = norm(&send(&mut b, &Op::Simple(q.into()), "b").await);
            assert_eq!(x, y, "{}", report(q));
        }
        let (ta, tb) = (
            table_contents(&control, "a").await,
            table_contents(&control, "b").await,
        );
        assert_eq!(ta, tb, "{}", report("the tables differ afterwards"));
        if changed {
            // The concurrent writer's change is not one the session waits for: let the replica
            // replay it before the next transaction reads there.
            caught_up(&env).await;
        }
    }

    let end = env.proxy.app.transactions.counts();
    let total = |o: &str| end.get(o) - start_counts.get(o);
    println!(
        "{rounds} transactions (seed {seed}): {}; replays {}",
        OUTCOMES
            .iter()
            .map(|o| format!("{o} {}", total(o)))
            .collect::<Vec<_>>()
            .join(", "),
        end.replays - start_counts.replays
    );
    println!(
        "change rounds: {change_rounds} with a change ({refused} refused with 40001, {change_replayed} replayed and went on), {skipped_changes} without (started on the primary)"
    );
    assert!(total("replica") > 0, "no transaction ended on the replica");
    assert!(total("replayed") > 0, "no transaction was replayed");
    assert!(refused > 0, "no concurrent change was detected (40001)");
    assert!(
        change_replayed > 0,
        "no change round went on (a change to a row not read)"
    );
}
