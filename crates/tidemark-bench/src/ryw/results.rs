//! The ryw report: the results table, ryw.csv/.json/.md and the SVG chart.

use anyhow::{Context, Result};

use super::cell::Statements;
use super::{profile_name, CellResult, Mode, Profile, RywArgs};
use crate::report::{self, f1, f2, ChartPanel, Table};
use crate::workspace_path;

pub(super) fn result_table() -> Table {
    Table::new(
        &[
            "profile",
            "mode",
            "stale reads",
            "stale %",
            "stale read-backs",
            "reads on replicas %",
            "read p50 ms",
            "read p99 ms",
            "reads/s",
            "writes/s",
            "errors",
        ],
        2,
    )
}

pub(super) fn table_row(r: &CellResult) -> Vec<String> {
    vec![
        r.profile.clone(),
        r.mode.clone(),
        r.stale.to_string(),
        f2(r.stale_pct),
        format!("{}/{}", r.stale_read_backs, r.read_backs),
        f1(r.replica_pct),
        f2(r.read_p50_us as f64 / 1000.0),
        f2(r.read_p99_us as f64 / 1000.0),
        format!("{:.0}", r.reads_per_s),
        format!("{:.0}", r.writes_per_s),
        r.errors.to_string(),
    ]
}

pub(super) fn report_results(
    args: &RywArgs,
    modes: &[(Mode, String)],
    profiles: &[Profile],
    results: &[CellResult],
) -> Result<()> {
    let mut table = result_table();
    for r in results {
        table.push(table_row(r));
    }
    println!();
    print!("{}", table.text());
    report::write(&args.out.join("ryw.csv"), &table.csv())?;
    report::write(
        &args.out.join("ryw.json"),
        &serde_json::to_string_pretty(results).context("encoding JSON")?,
    )?;
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let unnamed: Vec<&str> = modes
        .iter()
        .filter(|m| Statements::for_mode(m.0, args.unnamed) == Statements::Unnamed)
        .map(|m| m.1.as_str())
        .collect();
    let statements = match unnamed.len() {
        0 => "named prepared statements".to_string(),
        n if n == modes.len() => "unnamed statements".to_string(),
        _ => format!(
            "named prepared statements (unnamed in {})",
            unnamed.join(", ")
        ),
    };
    let md = format!(
        "Command: `tidemark-bench {}` — {} users, {} feed reads per write, think time {}, {} per cell, {statements}{}.\n\n{}",
        cmd.join(" "),
        args.users,
        args.feed_reads,
        humantime::format_duration(args.think),
        humantime::format_duration(args.duration),
        if args.orm {
            format!(
                ", ORM-style (every request a transaction), routing.transactions = {}",
                args.transactions
            )
        } else {
            String::new()
        },
        table.markdown()
    );
    report::write(&args.out.join("ryw.md"), &md)?;
    let mode_names: Vec<String> = modes.iter().map(|m| m.1.clone()).collect();
    let panel = |title: &'static str, f: fn(&CellResult) -> f64| ChartPanel {
        title,
        groups: profiles
            .iter()
            .map(|p| {
                let pn = profile_name(*p);
                let vals = mode_names
                    .iter()
                    .map(|m| {
                        results
                            .iter()
                            .find(|r| r.profile == pn && &r.mode == m)
                            .map(f)
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                (pn, vals)
            })
            .collect(),
    };
    let svg = report::svg_chart(
        &format!(
            "Read-after-write: {} users, {} feed reads per write, think {}, {} per cell",
            args.users,
            args.feed_reads,
            humantime::format_duration(args.think),
            humantime::format_duration(args.duration)
        ),
        &mode_names,
        &[
            panel(
                "Stale reads: the user's own row older than the user's last write (% of reads)",
                |r| r.stale_pct,
            ),
            panel("Reads served by replicas (%)", |r| r.replica_pct),
        ],
    );
    let svg_path = args
        .svg
        .clone()
        .unwrap_or_else(|| workspace_path("docs/bench-ryw.svg"));
    report::write(&svg_path, &svg)?;
    eprintln!(
        "wrote {}/ryw.{{csv,json,md}} and {}",
        args.out.display(),
        svg_path.display()
    );
    Ok(())
}
