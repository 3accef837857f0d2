//! Owns presentation: percentiles and medians, plain-text and Markdown tables, CSV and JSON
//! files, and the hand-written SVG chart of the read-after-write results.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// `p`-th percentile (0..=100) of an ascending slice, nearest rank.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// A table with a header row; renders aligned text for the terminal and Markdown for docs.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Columns that are numbers (right-aligned).
    pub numeric: Vec<bool>,
}

impl Table {
    pub fn new(header: &[&str], numeric_from: usize) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            numeric: (0..header.len()).map(|i| i >= numeric_from).collect(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn text(&self) -> String {
        let n = self.header.len();
        let mut w = vec![0; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |r: &Vec<String>, out: &mut String| {
            let cells: Vec<String> = (0..n)
                .map(|i| {
                    let c = r.get(i).map(String::as_str).unwrap_or("");
                    if self.numeric[i] {
                        format!("{c:>width$}", width = w[i])
                    } else {
                        format!("{c:<width$}", width = w[i])
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        };
        line(&self.header, &mut out);
        let _ = writeln!(
            out,
            "{}",
            w.iter()
                .map(|k| "-".repeat(*k))
                .collect::<Vec<_>>()
                .join("  ")
        );
        for r in &self.rows {
            line(r, &mut out);
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let seps: Vec<&str> = self
            .numeric
            .iter()
            .map(|n| if *n { "---:" } else { "---" })
            .collect();
        let _ = writeln!(out, "|{}|", seps.join("|"));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }

    pub fn csv(&self) -> String {
        let esc = |s: &String| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.clone()
            }
        };
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let _ = writeln!(out, "{}", r.iter().map(esc).collect::<Vec<_>>().join(","));
        }
        out
    }
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn f1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "–".into()
    }
}

pub fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "–".into()
    }
}

pub fn f0(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "–".into()
    }
}

/// One bar group of the chart: a profile, with one value per mode.
pub struct ChartPanel<'a> {
    pub title: &'a str,
    /// (profile, values per mode in `modes` order; NaN = not run)
    pub groups: Vec<(String, Vec<f64>)>,
}

/// Two stacked grouped-bar panels (e.g. stale % and replica share), one bar per mode in each
/// profile group, values 0..=100.
pub fn svg_chart(title: &str, modes: &[String], panels: &[ChartPanel<'_>]) -> String {
    const COLORS: [&str; 8] = [
        "#6b7280", "#dc2626", "#f59e0b", "#eab308", "#2563eb", "#059669", "#7c3aed", "#db2777",
    ];
    let groups = panels.first().map(|p| p.groups.len()).unwrap_or(0).max(1);
    let bar_w = 14.0;
    let group_gap = 26.0;
    let group_w = modes.len() as f64 * bar_w + group_gap;
    let left = 56.0;
    let plot_w = groups as f64 * group_w;
    let width = left + plot_w + 20.0;
    let panel_h = 170.0;
    let top = 58.0;
    let panel_gap = 62.0;
    let height = top + panels.len() as f64 * (panel_h + panel_gap) + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        xml(title)
    );
    // Legend.
    let mut lx = left;
    for (i, m) in modes.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.0}" y="28" width="10" height="10" fill="{c}"/><text x="{:.0}" y="37">{}</text>"#,
            lx + 13.0,
            xml(m)
        );
        lx += 20.0 + 7.0 * m.len() as f64;
    }
    for (pi, panel) in panels.iter().enumerate() {
        let y0 = top + pi as f64 * (panel_h + panel_gap) + 14.0;
        let base = y0 + panel_h;
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{:.0}" font-weight="bold">{}</text>"#,
            y0 - 4.0,
            xml(panel.title)
        );
        for t in [0, 25, 50, 75, 100] {
            let y = base - panel_h * t as f64 / 100.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{:.0}" y="{:.1}" text-anchor="end">{t}%</text>"##,
                left + plot_w,
                left - 4.0,
                y + 4.0
            );
        }
        for (gi, (label, vals)) in panel.groups.iter().enumerate() {
            let gx = left + gi as f64 * group_w + group_gap / 2.0;
            for (mi, v) in vals.iter().enumerate() {
                let x = gx + mi as f64 * bar_w;
                let c = COLORS[mi % COLORS.len()];
                if !v.is_finite() {
                    continue;
                }
                let h =
                    (panel_h * v.clamp(0.0, 100.0) / 100.0).max(if *v > 0.0 { 1.5 } else { 0.0 });
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{c}"><title>{}: {} {:.2}%</title></rect>"#,
                    base - h,
                    bar_w - 2.0,
                    xml(label),
                    xml(&modes[mi]),
                    v
                );
                if *v == 0.0 {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle" fill="{c}">0</text>"#,
                        x + (bar_w - 2.0) / 2.0,
                        base - 2.0
                    );
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                gx + modes.len() as f64 * bar_w / 2.0,
                base + 15.0,
                xml(label)
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.0}" y1="{base:.1}" y2="{base:.1}" stroke="#111827"/>"##,
            left + plot_w
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn tables_render() {
        let mut t = Table::new(&["mode", "n"], 1);
        t.push(vec!["a,b".into(), "1".into()]);
        assert!(t.text().contains("a,b"));
        assert!(t.markdown().contains("|---|---:|"));
        assert!(t.csv().contains("\"a,b\",1"));
    }

    #[test]
    fn chart_is_svg() {
        let modes = vec!["primary".to_string(), "tidemark".to_string()];
        let p = ChartPanel {
            title: "stale %",
            groups: vec![("0ms".into(), vec![0.0, 50.0])],
        };
        let s = svg_chart("t", &modes, &[p]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
}
