//! From runs to the report: medians and paired ratios per target, tables, CSV/JSON/Markdown files.

use anyhow::{Context, Result};
use serde::Serialize;

use super::{workloads, Memory, PgbenchArgs, RunResult, Target, Workload};
use crate::report::{self, f0, f1, f2, median, Table};

#[derive(Clone, Debug, Serialize)]
struct Summary {
    workload: String,
    clients: u32,
    target: Target,
    runs_ok: usize,
    tps: f64,
    tps_ratio_to_direct: f64,
    lat_avg_ms: f64,
    added_latency_us: f64,
    lat_p99_ms: f64,
    cpu_user_us: f64,
    cpu_sys_us: f64,
    machine_us: f64,
    idle_pct: f64,
    error: Option<String>,
}

fn summarize(targets: &[Target], wl: &[Workload], runs: &[RunResult]) -> Vec<Summary> {
    let mut out = vec![];
    for w in wl {
        let of = |t: Target| -> Vec<&RunResult> {
            runs.iter()
                .filter(|r| r.target == t && r.workload == w.name && r.clients == w.clients)
                .collect()
        };
        let direct = of(Target::Direct);
        for &t in targets {
            if !w.applies_to(t) {
                continue;
            }
            let mine = of(t);
            let ok: Vec<&&RunResult> = mine.iter().filter(|r| r.error.is_none()).collect();
            // Ratios and differences against direct in the same repetition.
            let paired = |f: &dyn Fn(&RunResult, &RunResult) -> f64| -> f64 {
                let v: Vec<f64> = ok
                    .iter()
                    .filter_map(|r| {
                        let d = direct
                            .iter()
                            .find(|d| d.rep == r.rep && d.error.is_none())?;
                        Some(f(r, d))
                    })
                    .collect();
                median(&v)
            };
            out.push(Summary {
                workload: w.label(),
                clients: w.clients,
                target: t,
                runs_ok: ok.len(),
                tps: median(&ok.iter().map(|r| r.tps).collect::<Vec<_>>()),
                tps_ratio_to_direct: paired(&|r, d| r.tps / d.tps),
                lat_avg_ms: median(&ok.iter().map(|r| r.lat_avg_ms).collect::<Vec<_>>()),
                added_latency_us: paired(&|r, d| (r.lat_avg_ms - d.lat_avg_ms) * 1000.0),
                lat_p99_ms: median(&ok.iter().map(|r| r.lat_p99_ms).collect::<Vec<_>>()),
                cpu_user_us: median(&ok.iter().map(|r| r.cpu_user_us).collect::<Vec<_>>()),
                cpu_sys_us: median(&ok.iter().map(|r| r.cpu_sys_us).collect::<Vec<_>>()),
                machine_us: median(&ok.iter().map(|r| r.machine_us).collect::<Vec<_>>()),
                idle_pct: median(&ok.iter().map(|r| r.idle_pct).collect::<Vec<_>>()),
                error: mine.iter().find_map(|r| r.error.clone()),
            });
        }
    }
    out
}

/// Median over repetitions of tps(a) / tps(b) − 1, for the same workload.
fn paired_cost(runs: &[RunResult], w: &Workload, a: Target, b: Target) -> f64 {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.target == a && r.workload == w.name && r.clients == w.clients)
        .filter(|r| r.error.is_none())
        .filter_map(|ra| {
            let rb = runs.iter().find(|r| {
                r.target == b
                    && r.workload == w.name
                    && r.clients == w.clients
                    && r.rep == ra.rep
                    && r.error.is_none()
            })?;
            Some(100.0 * (1.0 - ra.tps / rb.tps))
        })
        .collect();
    median(&v)
}

pub(super) fn report_results(
    args: &PgbenchArgs,
    targets: &[Target],
    runs: &[RunResult],
    memory: &[Memory],
) -> Result<()> {
    let wl = workloads(args);
    let summary = summarize(targets, &wl, runs);
    let mut t = Table::new(
        &[
            "workload",
            "clients",
            "target",
            "tps",
            "tps / direct",
            "latency avg ms",
            "added µs",
            "p99 ms",
            "proxy CPU µs/stmt user + sys",
            "machine CPU µs/stmt (idle %)",
            "runs ok",
        ],
        3,
    );
    for s in &summary {
        let mut row = vec![
            s.workload.clone(),
            s.clients.to_string(),
            s.target.name().to_string(),
            f0(s.tps),
            f2(s.tps_ratio_to_direct),
            format!("{:.3}", s.lat_avg_ms),
            if s.target == Target::Direct {
                "–".into()
            } else {
                f0(s.added_latency_us)
            },
            format!("{:.3}", s.lat_p99_ms),
            if s.cpu_user_us.is_nan() {
                "–".into()
            } else {
                format!("{} + {}", f1(s.cpu_user_us), f1(s.cpu_sys_us))
            },
            if s.machine_us.is_nan() {
                "–".into()
            } else {
                format!("{} ({})", f1(s.machine_us), f1(s.idle_pct))
            },
            format!("{}/{}", s.runs_ok, args.reps),
        ];
        if s.runs_ok == 0 {
            let e = s.error.clone().unwrap_or_default();
            let short: String = e.chars().take(70).collect();
            row[3] = format!("fails: {short}");
            for c in row.iter_mut().take(10).skip(4) {
                *c = "–".into();
            }
        }
        t.push(row);
    }
    let mut cmp = Table::new(&["comparison", "workload", "clients", "tps cost %"], 3);
    let pairs = [
        (
            Target::TidemarkSession,
            Target::TidemarkNotrack,
            "write tracking on vs off (issue 6: < 5 %)",
        ),
        (
            Target::TidemarkSession,
            Target::TidemarkEventual,
            "session vs eventual (issue 6: < 3 %)",
        ),
        (
            Target::TidemarkSession,
            Target::Pgbouncer,
            "tidemark (session) vs PgBouncer",
        ),
        (
            Target::TidemarkStrong,
            Target::Pgbouncer,
            "tidemark (strong) vs PgBouncer",
        ),
        (
            Target::TidemarkAlt,
            Target::TidemarkSession,
            "alt build vs tidemark (session)",
        ),
        (
            Target::TidemarkAlt,
            Target::Pgbouncer,
            "alt build vs PgBouncer",
        ),
        (
            Target::TidemarkSession,
            Target::Pipe,
            "tidemark (session) vs the byte pipe",
        ),
        (
            Target::Pgbouncer,
            Target::Pipe,
            "PgBouncer vs the byte pipe",
        ),
        (
            Target::DirectReplicas,
            Target::Direct,
            "the replicas vs the primary, no proxy (the nodes share the cores)",
        ),
        (
            Target::TidemarkSession,
            Target::DirectReplicas,
            "tidemark (session) vs direct to the replicas (same servers)",
        ),
    ];
    for (a, b, label) in pairs {
        if !targets.contains(&a) || !targets.contains(&b) {
            continue;
        }
        for w in &wl {
            if !w.applies_to(a) || !w.applies_to(b) {
                continue;
            }
            // Tracking only differs when something writes; session vs eventual only on reads.
            if b == Target::TidemarkNotrack && w.name != "tpcb" {
                continue;
            }
            let c = paired_cost(runs, w, a, b);
            cmp.push(vec![label.into(), w.label(), w.clients.to_string(), f1(c)]);
        }
    }
    let mut mem = Table::new(
        &[
            "proxy",
            "idle clients",
            "before KiB",
            "after KiB",
            "KiB per client",
            "how",
        ],
        1,
    );
    for m in memory {
        mem.push(vec![
            m.proxy.clone(),
            m.clients.to_string(),
            m.rss_before_kib.to_string(),
            m.rss_after_kib.to_string(),
            f1(m.kib_per_client),
            m.note.clone(),
        ]);
    }
    println!();
    print!("{}", t.text());
    println!();
    print!("{}", cmp.text());
    println!();
    print!("{}", mem.text());
    let mut raw = Table::new(
        &[
            "rep",
            "target",
            "workload",
            "clients",
            "tps",
            "lat_avg_ms",
            "lat_p99_ms",
            "cpu_user_us_per_stmt",
            "cpu_sys_us_per_stmt",
            "machine_us_per_stmt",
            "idle_pct",
            "error",
        ],
        4,
    );
    for r in runs {
        raw.push(vec![
            (r.rep + 1).to_string(),
            r.target.name().into(),
            r.workload.clone(),
            r.clients.to_string(),
            format!("{:.1}", r.tps),
            format!("{:.4}", r.lat_avg_ms),
            format!("{:.4}", r.lat_p99_ms),
            format!("{:.2}", r.cpu_user_us),
            format!("{:.2}", r.cpu_sys_us),
            format!("{:.2}", r.machine_us),
            format!("{:.1}", r.idle_pct),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    report::write(&args.out.join("pgbench-runs.csv"), &raw.csv())?;
    report::write(&args.out.join("pgbench.csv"), &t.csv())?;
    let json = serde_json::json!({
        "runs": runs,
        "summary": summary,
        "memory": memory,
    });
    report::write(
        &args.out.join("pgbench.json"),
        &serde_json::to_string_pretty(&json).context("encoding JSON")?,
    )?;
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let md = format!(
        "Command: `tidemark-bench {}` — {} repetitions of {} s per run, medians; ratios and \
         added latency against direct in the same repetition.\n\n{}\n{}\n{}",
        cmd.join(" "),
        args.reps,
        args.duration.as_secs(),
        t.markdown(),
        cmp.markdown(),
        mem.markdown()
    );
    report::write(&args.out.join("pgbench.md"), &md)?;
    eprintln!(
        "wrote {}/pgbench{{.csv,-runs.csv,.json,.md}}",
        args.out.display()
    );
    Ok(())
}
