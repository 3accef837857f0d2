//! The status page (`GET /`) and its data (`GET /status.json`): nodes with role, lag and
//! gate state; the routing split and fallbacks by reason over the last minute; pools;
//! replication slots. The page is one self-contained HTML document (inline CSS and JS, no
//! external assets, no build step) that fetches the JSON every second.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use tidemark_core::PrimaryState;

use crate::app::App;

/// The data behind the status page.
pub fn json(app: &App) -> Value {
    let v = app.view.load();
    let nodes: Vec<Value> = v
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "role": n.role.as_str(),
                "healthy": n.healthy,
                "in_rotation": n.in_rotation,
                "lsn": n.replay_lsn.to_string(),
                "lag_ms": n.lag.as_secs_f64() * 1000.0,
                "lag_bytes": n.lag_bytes,
                "sync_state": n.sync_state.as_str(),
                "synchronous_apply": n.synchronous_apply,
            })
        })
        .collect();
    let (primary, split_brain) = match &v.primary {
        PrimaryState::One(p) => (v.nodes.get(*p).map(|n| n.name.clone()), false),
        PrimaryState::SplitBrain(_) => (None, true),
        PrimaryState::Unknown => (None, false),
    };
    let m = crate::metrics::recent::summary(60);
    let reads = m.replica_reads + m.primary_reads;
    let share = (reads > 0).then(|| m.replica_reads as f64 / reads as f64);
    let fallbacks: serde_json::Map<String, Value> = m
        .fallbacks
        .iter()
        .map(|(r, n)| (r.to_string(), json!(n)))
        .collect();
    let per_second: Vec<Value> = m
        .per_second
        .iter()
        .map(|(r, p, f)| json!([r, p, f]))
        .collect();
    let pools: Vec<Value> = app
        .pools
        .all()
        .iter()
        .map(|p| {
            let s = &p.stats;
            json!({
                "name": p.name,
                "database": p.key.database,
                "user": p.key.user,
                "node": app.node_name(p.key.node),
                "active": s.in_use.load(Ordering::Relaxed),
                "idle": p.idle_count(),
                "waiting": s.waiting.load(Ordering::Relaxed),
                "max": p.max_size(),
                "checkouts": s.checkouts.load(Ordering::Relaxed),
                "timeouts": s.timeouts.load(Ordering::Relaxed),
            })
        })
        .collect();
    let slots: Vec<Value> = crate::slots::snapshot()
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "type": s.kind,
                "active": s.active,
                "retained_bytes": s.retained_bytes,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "clients": app.client_count(),
        "paused": *app.paused.borrow(),
        "primary": primary,
        "split_brain": split_brain,
        "primary_lsn": v.primary_lsn.to_string(),
        "nodes": nodes,
        "routing": {
            "window_s": m.window_seconds,
            "statements": m.statements,
            "replica_reads": m.replica_reads,
            "primary_reads": m.primary_reads,
            "replica_share": share,
            "errors": m.errors,
            "fallbacks": fallbacks,
            "per_second": per_second,
        },
        "pools": pools,
        "slots": slots,
    })
}

/// The page, with the current data embedded so it renders before the first fetch.
pub fn page(app: &App) -> String {
    // `</` inside a <script> element would end it early.
    let data = json(app).to_string().replace("</", "<\\/");
    PAGE.replace("__INITIAL__", &data)
}

const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tidemark status</title>
<style>
:root{--bg:#0f1419;--panel:#182029;--line:#2a3542;--fg:#e6edf3;--dim:#8b98a5;--ok:#3fb950;--warn:#d29922;--bad:#f85149;--rep:#3fb950;--pri:#58a6ff;--fb:#d29922}
*{box-sizing:border-box}
body{margin:0;padding:20px 24px;background:var(--bg);color:var(--fg);font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
h1{font-size:20px;margin:0 0 4px}h2{font-size:13px;text-transform:uppercase;letter-spacing:.06em;color:var(--dim);margin:0 0 10px;font-weight:600}
.sub{color:var(--dim);margin-bottom:16px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin-bottom:14px}
.card,.panel{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.panel{margin-bottom:14px}
.big{font-size:28px;font-weight:600;font-variant-numeric:tabular-nums}
.lbl{color:var(--dim);font-size:12px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
th{color:var(--dim);font-weight:500;font-size:12px}
td.n,th.n{text-align:right}
.b{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#1f3d2a;color:var(--ok)}.bad{background:#4a1e1e;color:var(--bad)}.warn{background:#3d3117;color:var(--warn)}.dim{background:#222c36;color:var(--dim)}
.bar{height:8px;background:#222c36;border-radius:4px;overflow:hidden;min-width:80px}.bar>i{display:block;height:100%;background:var(--pri)}
.two{display:grid;grid-template-columns:2fr 1fr;gap:14px}
@media (max-width:900px){.two{grid-template-columns:1fr}}
.legend span{margin-right:14px;color:var(--dim);font-size:12px}.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
#stale{display:none;color:var(--bad);margin-left:8px}
svg{display:block;width:100%;height:120px}
</style></head>
<body>
<h1>tidemark <span id="stale">&#9679; not updating</span></h1>
<div class="sub" id="sub"></div>
<div class="grid">
 <div class="card"><div class="lbl">reads on replicas (last min)</div><div class="big" id="share">–</div></div>
 <div class="card"><div class="lbl">reads / s</div><div class="big" id="rps">–</div></div>
 <div class="card"><div class="lbl">fallbacks (last min)</div><div class="big" id="fb">–</div></div>
 <div class="card"><div class="lbl">errors (last min)</div><div class="big" id="err">–</div></div>
 <div class="card"><div class="lbl">clients</div><div class="big" id="clients">–</div></div>
</div>
<div class="panel"><h2>Nodes</h2><table id="nodes"></table></div>
<div class="two">
 <div class="panel"><h2>Routing, last 60 s</h2>
  <div class="legend"><span><i style="background:var(--rep)"></i>replica reads</span><span><i style="background:var(--pri)"></i>primary reads</span><span><i style="background:var(--fb)"></i>fallbacks</span></div>
  <svg id="chart" viewBox="0 0 600 120" preserveAspectRatio="none"></svg></div>
 <div class="panel"><h2>Fallbacks by reason, last 60 s</h2><table id="reasons"></table></div>
</div>
<div class="panel"><h2>Pools</h2><table id="pools"></table></div>
<div class="panel"><h2>Replication slots</h2><table id="slots"></table></div>
<script>
const INITIAL = __INITIAL__;
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const bytes = n => { n = Number(n) || 0; const u = ['B','kB','MB','GB','TB']; let i = 0; while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; } return (i ? n.toFixed(1) : n) + ' ' + u[i]; };
const badge = (cls, t) => `<span class="b ${cls}">${esc(t)}</span>`;
const $ = id => document.getElementById(id);
function table(el, head, rows, empty) {
  const h = '<tr>' + head.map(c => `<th class="${c[1]||''}">${esc(c[0])}</th>`).join('') + '</tr>';
  el.innerHTML = h + (rows.length ? rows.join('') : `<tr><td colspan="${head.length}" style="color:var(--dim)">${esc(empty)}</td></tr>`);
}
function render(d) {
  const r = d.routing, reads = r.replica_reads + r.primary_reads;
  const fbTotal = Object.values(r.fallbacks).reduce((a, b) => a + b, 0);
  $('sub').innerHTML = `primary: <b>${esc(d.primary || 'none known')}</b> · WAL ${esc(d.primary_lsn)}` +
    (d.split_brain ? ' · ' + badge('bad', 'SPLIT BRAIN') : '') + (d.paused ? ' · ' + badge('warn', 'PAUSED') : '') + ` · v${esc(d.version)}`;
  $('share').textContent = r.replica_share == null ? '–' : (100 * r.replica_share).toFixed(1) + '%';
  $('rps').textContent = (reads / r.window_s).toFixed(1);
  $('fb').textContent = fbTotal;
  $('err').textContent = r.errors;
  $('clients').textContent = d.clients;
  table($('nodes'), [['node'], ['role'], ['health'], ['gate'], ['LSN'], ['lag ms', 'n'], ['lag bytes', 'n']],
    d.nodes.map(n => `<tr><td><b>${esc(n.name)}</b></td><td>${badge(n.role === 'primary' ? 'ok' : n.role === 'replica' ? 'dim' : 'warn', n.role)}</td>` +
      `<td>${badge(n.healthy ? 'ok' : 'bad', n.healthy ? 'up' : 'down')}</td>` +
      `<td>${n.role === 'primary' ? badge('dim', 'writes') : badge(n.in_rotation ? 'ok' : 'warn', n.in_rotation ? 'in rotation' : 'out')}</td>` +
      `<td>${esc(n.lsn)}</td><td class="n">${n.role === 'replica' ? n.lag_ms.toFixed(1) : '–'}</td><td class="n">${n.role === 'replica' ? bytes(n.lag_bytes) : '–'}</td></tr>`), 'no nodes');
  const reasons = Object.entries(r.fallbacks).sort((a, b) => b[1] - a[1]);
  table($('reasons'), [['reason'], ['count', 'n'], ['share of reads', 'n']],
    reasons.map(([k, v]) => `<tr><td>${esc(k)}</td><td class="n">${v}</td><td class="n">${reads ? (100 * v / reads).toFixed(1) + '%' : '–'}</td></tr>`), 'no fallbacks');
  table($('pools'), [['pool'], ['active', 'n'], ['idle', 'n'], ['waiting', 'n'], ['max', 'n'], ['saturation'], ['checkouts', 'n'], ['timeouts', 'n']],
    d.pools.map(p => { const sat = p.max ? p.active / p.max : 0;
      return `<tr><td>${esc(p.name)}</td><td class="n">${p.active}</td><td class="n">${p.idle}</td><td class="n">${p.waiting ? badge('warn', p.waiting) : 0}</td><td class="n">${p.max}</td>` +
      `<td><div class="bar"><i style="width:${(100 * sat).toFixed(0)}%;background:${sat > .9 ? 'var(--bad)' : sat > .7 ? 'var(--warn)' : 'var(--pri)'}"></i></div></td><td class="n">${p.checkouts}</td><td class="n">${p.timeouts}</td></tr>`; }), 'no pools yet');
  table($('slots'), [['slot'], ['type'], ['consumer'], ['retained WAL', 'n']],
    d.slots.map(s => `<tr><td>${esc(s.name)}</td><td>${esc(s.type)}</td><td>${badge(s.active ? 'ok' : 'warn', s.active ? 'active' : 'inactive')}</td><td class="n">${bytes(s.retained_bytes)}</td></tr>`), 'no replication slots (or not polled yet)');
  const ps = r.per_second, W = 600, H = 120, bw = W / Math.max(ps.length, 1);
  const max = Math.max(1, ...ps.map(x => x[0] + x[1]));
  let svg = '';
  ps.forEach((x, i) => {
    const hr = H * x[0] / max, hp = H * x[1] / max, X = (i * bw).toFixed(2), w = Math.max(bw - 1, 1).toFixed(2);
    svg += `<rect x="${X}" y="${(H - hr).toFixed(2)}" width="${w}" height="${hr.toFixed(2)}" fill="var(--rep)"/>`;
    svg += `<rect x="${X}" y="${(H - hr - hp).toFixed(2)}" width="${w}" height="${hp.toFixed(2)}" fill="var(--pri)"/>`;
    if (x[2]) svg += `<rect x="${X}" y="0" width="${w}" height="4" fill="var(--fb)"/>`;
  });
  $('chart').innerHTML = svg;
}
render(INITIAL);
let failures = 0;
async function tick() {
  try {
    const res = await fetch('/status.json', {cache: 'no-store'});
    render(await res.json());
    failures = 0;
  } catch (e) { failures++; }
  $('stale').style.display = failures > 1 ? 'inline' : 'none';
  setTimeout(tick, 1000);
}
setTimeout(tick, 1000);
</script>
</body></html>
"##;
