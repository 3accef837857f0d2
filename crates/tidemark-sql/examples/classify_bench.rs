//! Measures statement classification cost: a cold parse (cache miss on a distinct text), a cache
//! hit, and a hint scan, for a few representative statements. Prints a Markdown table of the
//! median over several rounds.
//!
//! `cargo run --release -p tidemark-sql --example classify_bench`

use std::hint::black_box;
use std::time::Instant;

use tidemark_sql::{scan_hints, Classifier, FunctionPolicy};

const ROUNDS: usize = 7;

/// Statement templates; `{}` is replaced by a number to make texts distinct.
const CASES: &[(&str, &str)] = &[
    ("simple SELECT by pk", "SELECT id, name, email FROM users WHERE id = {}"),
    (
        "JOIN",
        "SELECT u.id, u.name, o.id, o.total FROM users u JOIN orders o ON o.user_id = u.id \
         WHERE u.id = {} AND o.created_at > now() - interval '30 days' ORDER BY o.created_at DESC LIMIT 20",
    ),
    (
        "INSERT",
        "INSERT INTO orders (user_id, total, created_at) VALUES ({}, 42.50, now()) RETURNING id",
    ),
    (
        "writable CTE",
        "WITH moved AS (DELETE FROM queue WHERE id = {} RETURNING *) \
         INSERT INTO done SELECT * FROM moved RETURNING id",
    ),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per call of `f` over `iters` calls, median of ROUNDS rounds.
fn measure(iters: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut rounds = Vec::with_capacity(ROUNDS);
    for r in 0..ROUNDS {
        let start = Instant::now();
        for i in 0..iters {
            f(r * iters + i);
        }
        rounds.push(start.elapsed().as_nanos() as f64 / iters as f64);
    }
    median(rounds)
}

fn main() {
    println!("| statement | cold parse (ns) | of which `pg_query::parse` (ns) | cache hit (ns) | hint scan (ns) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, template) in CASES {
        let cold_iters = 2_000;
        let texts: Vec<String> = (0..cold_iters * ROUNDS)
            .map(|i| template.replace("{}", &i.to_string()))
            .collect();
        let classifier = Classifier::new(100_000, FunctionPolicy::default());
        let cold = measure(cold_iters, |i| {
            black_box(classifier.classify(&texts[i]));
        });

        let raw = measure(cold_iters, |i| {
            black_box(pg_query::parse(&texts[i]).ok());
        });

        let hot_text = format!(
            "/* tidemark: replica, key=user:42 */ {}",
            template.replace("{}", "7")
        );
        let hot = Classifier::new(1_000, FunctionPolicy::default());
        hot.classify(&hot_text);
        let hit = measure(200_000, |_| {
            black_box(hot.classify(black_box(&hot_text)));
        });
        let hints = measure(200_000, |_| {
            black_box(scan_hints(black_box(&hot_text)));
        });
        println!("| {name} | {cold:.0} | {raw:.0} | {hit:.0} | {hints:.0} |");
    }
}
