"""A self-contained interactive HTML page: data inline as JSON, drawn by inline JavaScript into
SVG (2D projections, metric curves) and a canvas (3D projections, drag to rotate).
No CDN, no network, no external file: the page works when mailed or opened offline."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .metrics import GLOBAL_LAYER, _jsonable, natural_key
from .projection import Projection


def _projection_data(projection: Projection) -> dict:
    points = []
    for coordinates, role, (iteration, step) in zip(projection.coordinates, projection.roles, projection.labels):
        points.append({"role": role, "iteration": iteration, "step": step, "xyz": [float(c) for c in coordinates]})
    axes = [f"{projection.method.upper()} {i + 1}" for i in range(projection.dims)]
    if projection.explained_variance_ratio is not None:
        axes = [f"{a} ({100 * r:.1f} %)" for a, r in zip(axes, projection.explained_variance_ratio)]
    return {"method": projection.method, "dims": projection.dims, "axes": axes, "points": points}


def _layer_grid(metrics: dict) -> dict:
    """Angle(ΔR_t, Δπ_t+1) per tensor and iteration, as a grid for the heat map."""
    rows = [r for r in metrics["pairs"] if r["kind"] == "reward_then_policy" and r["layer"] != GLOBAL_LAYER]
    names = sorted({r["layer"] for r in rows}, key=natural_key)
    iterations = sorted({r["iteration"] for r in rows})
    angles = [[None] * len(iterations) for _ in names]
    for r in rows:
        angles[names.index(r["layer"])][iterations.index(r["iteration"])] = r["angle_deg"]
    return {"names": names, "iterations": iterations, "angles": angles}


def page_data(metrics: dict, projections: list[Projection], title: str) -> dict:
    global_pairs = [r for r in metrics["pairs"] if r["layer"] == GLOBAL_LAYER]
    return _jsonable(
        {
            "title": title,
            "summary": metrics["summary"],
            "guided": [r for r in global_pairs if r["kind"] == "reward_then_policy"],
            "consecutive": [r for r in global_pairs if r["kind"] == "policy_consecutive"],
            "norms": metrics["delta_norms"],
            "projections": [_projection_data(p) for p in projections],
            "layers": _layer_grid(metrics),
        }
    )


def _script_safe_json(data: dict) -> str:
    # "</" would end the <script> element early; "\u2028/9" are line ends to old JS parsers.
    return (
        json.dumps(data, allow_nan=False)
        .replace("</", "<\\/")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.5em; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; }
.panel { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
#tooltip { position: fixed; pointer-events: none; background: #333; color: #fff; font-size: 12px;
           padding: 3px 6px; border-radius: 3px; display: none; }
.note { color: #666; font-size: 0.85em; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var colours = {policy: "#1f77b4", reward: "#d62728", guided: "#2ca02c", pearson: "#9467bd"};
  var svgNS = "http://www.w3.org/2000/svg";
  var tooltip = document.getElementById("tooltip");

  function el(name, attrs, parent) {
    var node = document.createElementNS(svgNS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function fmt(v) {
    if (v === null) { return "n/a"; }
    if (Number.isInteger(v)) { return String(v); }
    return Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toFixed(4);
  }
  function showTip(evt, text) {
    tooltip.textContent = text; tooltip.style.display = "block";
    tooltip.style.left = (evt.clientX + 12) + "px"; tooltip.style.top = (evt.clientY + 12) + "px";
  }
  function hideTip() { tooltip.style.display = "none"; }
  function extent(values) {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) { if (v !== null && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    if (!isFinite(lo)) { return [0, 1]; }
    if (lo === hi) { return [lo - 1, hi + 1]; }
    var pad = 0.05 * (hi - lo);
    return [lo - pad, hi + pad];
  }
  function scale(domain, range) {
    return function (v) { return range[0] + (v - domain[0]) / (domain[1] - domain[0]) * (range[1] - range[0]); };
  }
  function frame(svg, x, y, xs, ys, xLabel, yLabel, w, h, m, xTicks) {
    el("line", {x1: m, y1: h - m, x2: w - 10, y2: h - m, stroke: "#888"}, svg);
    el("line", {x1: m, y1: 10, x2: m, y2: h - m, stroke: "#888"}, svg);
    [0, 0.5, 1].forEach(function (f) {
      var yv = ys[0] + f * (ys[1] - ys[0]);
      el("text", {x: m - 4, y: y(yv) + 3, "font-size": 10, "text-anchor": "end"}, svg).textContent = fmt(yv);
      if (!xTicks) {
        var xv = xs[0] + f * (xs[1] - xs[0]);
        el("text", {x: x(xv), y: h - m + 14, "font-size": 10, "text-anchor": "middle"}, svg).textContent = fmt(xv);
      }
    });
    (xTicks || []).forEach(function (xv) {  // iterations: integer ticks at the data
      el("text", {x: x(xv), y: h - m + 14, "font-size": 10, "text-anchor": "middle"}, svg).textContent = String(xv);
    });
    el("text", {x: (w + m) / 2, y: h - 4, "font-size": 11, "text-anchor": "middle"}, svg).textContent = xLabel;
    el("text", {x: 12, y: h / 2, "font-size": 11, "text-anchor": "middle",
                transform: "rotate(-90 12 " + (h / 2) + ")"}, svg).textContent = yLabel;
  }

  function lineChart(container, series, yLabel, fixedY, reference) {
    var w = 460, h = 260, m = 60;
    var svg = el("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h}, null);
    var xsAll = [], ysAll = [];
    series.forEach(function (s) { s.points.forEach(function (p) { xsAll.push(p[0]); ysAll.push(p[1]); }); });
    var xs = extent(xsAll), ys = fixedY || extent(ysAll);
    var x = scale(xs, [m, w - 10]), y = scale(ys, [h - m, 10]);
    var ticks = xsAll.filter(function (v, i) { return xsAll.indexOf(v) === i; }).sort(function (a, b) { return a - b; });
    frame(svg, x, y, xs, ys, "iteration t", yLabel, w, h, m, ticks);
    if (reference !== undefined) {
      el("line", {x1: m, x2: w - 10, y1: y(reference), y2: y(reference), stroke: "#999", "stroke-dasharray": "4 3"}, svg);
    }
    series.forEach(function (s, k) {
      var pts = s.points.filter(function (p) { return p[1] !== null; });
      var segments = [[]];  // an undefined value (null) breaks the line instead of bridging it
      s.points.forEach(function (p) {
        if (p[1] === null) { segments.push([]); } else { segments[segments.length - 1].push(x(p[0]) + "," + y(p[1])); }
      });
      segments.forEach(function (segment) {
        if (segment.length > 1) {
          el("polyline", {points: segment.join(" "), fill: "none", stroke: s.colour, "stroke-width": 1.5}, svg);
        }
      });
      pts.forEach(function (p) {
        var dot = el("circle", {cx: x(p[0]), cy: y(p[1]), r: 4, fill: s.colour}, svg);
        dot.addEventListener("mousemove", function (evt) { showTip(evt, s.name + " at t=" + p[0] + ": " + fmt(p[1])); });
        dot.addEventListener("mouseleave", hideTip);
      });
      el("text", {x: w - 14, y: 18 + 14 * k, "font-size": 11, fill: s.colour, "text-anchor": "end"}, svg).textContent = s.name;
    });
    container.appendChild(svg);
  }

  function scatter2d(container, projection) {
    var w = 520, h = 440, m = 52;
    var svg = el("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h}, null);
    var pts = projection.points;
    var xs = extent(pts.map(function (p) { return p.xyz[0]; })), ys = extent(pts.map(function (p) { return p.xyz[1]; }));
    var x = scale(xs, [m, w - 10]), y = scale(ys, [h - m, 10]);
    frame(svg, x, y, xs, ys, projection.axes[0], projection.axes[1], w, h, m);
    ["policy", "reward"].forEach(function (role) {
      var mine = pts.filter(function (p) { return p.role === role; });
      el("polyline", {points: mine.map(function (p) { return x(p.xyz[0]) + "," + y(p.xyz[1]); }).join(" "),
                      fill: "none", stroke: colours[role], "stroke-opacity": 0.5}, svg);
      mine.forEach(function (p, i) {
        var dot = el("circle", {cx: x(p.xyz[0]), cy: y(p.xyz[1]), r: i === 0 ? 6 : 4, fill: colours[role],
                                stroke: i === 0 ? "#000" : "none"}, svg);
        dot.addEventListener("mousemove", function (evt) {
          showTip(evt, role + ": iteration " + p.iteration + ", step " + p.step);
        });
        dot.addEventListener("mouseleave", hideTip);
      });
    });
    container.appendChild(svg);
  }

  function scatter3d(container, projection) {
    var canvas = document.createElement("canvas");
    canvas.width = 520; canvas.height = 440;
    canvas.style.cursor = "grab";
    container.appendChild(canvas);
    var note = document.createElement("div");
    note.className = "note"; note.textContent = "drag to rotate; axes: " + projection.axes.join(", ");
    container.appendChild(note);
    var ctx = canvas.getContext("2d");
    var pts = projection.points;
    var centre = [0, 1, 2].map(function (k) { var e = extent(pts.map(function (p) { return p.xyz[k]; })); return (e[0] + e[1]) / 2; });
    var radius = 1e-12;
    pts.forEach(function (p) {
      var d = Math.sqrt(p.xyz.reduce(function (a, v, k) { return a + (v - centre[k]) * (v - centre[k]); }, 0));
      radius = Math.max(radius, d);
    });
    var yaw = 0.6, pitch = 0.4, dragging = null;
    function view(v) {
      var a = (v[0] - centre[0]) / radius, b = (v[1] - centre[1]) / radius, c = (v[2] - centre[2]) / radius;
      var x1 = a * Math.cos(yaw) - c * Math.sin(yaw), z1 = a * Math.sin(yaw) + c * Math.cos(yaw);
      var y2 = b * Math.cos(pitch) - z1 * Math.sin(pitch), z2 = b * Math.sin(pitch) + z1 * Math.cos(pitch);
      return [canvas.width / 2 + 180 * x1, canvas.height / 2 - 180 * y2, z2];
    }
    function draw() {
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
      [[1, 0, 0], [0, 1, 0], [0, 0, 1]].forEach(function (axis, k) {
        var o = view(centre), e = view(centre.map(function (c, j) { return c + 0.5 * radius * axis[j]; }));
        ctx.strokeStyle = "#aaa"; ctx.beginPath(); ctx.moveTo(o[0], o[1]); ctx.lineTo(e[0], e[1]); ctx.stroke();
        ctx.fillStyle = "#666"; ctx.font = "11px sans-serif"; ctx.fillText(String(k + 1), e[0] + 3, e[1]);
      });
      ["policy", "reward"].forEach(function (role) {
        var mine = pts.filter(function (p) { return p.role === role; }).map(function (p) { return view(p.xyz); });
        ctx.strokeStyle = colours[role]; ctx.globalAlpha = 0.5; ctx.beginPath();
        mine.forEach(function (q, i) { if (i === 0) { ctx.moveTo(q[0], q[1]); } else { ctx.lineTo(q[0], q[1]); } });
        ctx.stroke(); ctx.globalAlpha = 1; ctx.fillStyle = colours[role];
        mine.forEach(function (q, i) { ctx.beginPath(); ctx.arc(q[0], q[1], i === 0 ? 6 : 3.5, 0, 2 * Math.PI); ctx.fill(); });
      });
    }
    canvas.addEventListener("mousedown", function (evt) { dragging = [evt.clientX, evt.clientY]; });
    window.addEventListener("mouseup", function () { dragging = null; });
    window.addEventListener("mousemove", function (evt) {
      if (!dragging) { return; }
      yaw += (evt.clientX - dragging[0]) * 0.01; pitch += (evt.clientY - dragging[1]) * 0.01;
      dragging = [evt.clientX, evt.clientY]; draw();
    });
    draw();
  }

  function angleColour(a) {  // 0° blue, 90° white, 180° red: departures from orthogonality stand out
    if (a === null) { return "#ccc"; }
    var f = Math.max(-1, Math.min(1, (a - 90) / 90)), c = Math.round(255 * (1 - Math.abs(f)));
    return f < 0 ? "rgb(" + c + "," + c + ",255)" : "rgb(255," + c + "," + c + ")";
  }

  function layerHeatmap(container, grid) {
    if (!grid.names.length) { container.textContent = "no per-tensor metrics"; return; }
    var cell = 22, rowHeight = Math.max(4, Math.min(14, Math.floor(600 / grid.names.length))), left = 8;
    var w = left + cell * grid.iterations.length + 10, h = rowHeight * grid.names.length + 24;
    var svg = el("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h}, null);
    grid.iterations.forEach(function (t, j) {
      el("text", {x: left + cell * j + cell / 2, y: h - 8, "font-size": 10, "text-anchor": "middle"}, svg).textContent = String(t);
    });
    grid.names.forEach(function (name, i) {
      grid.iterations.forEach(function (t, j) {
        var a = grid.angles[i][j];
        var rect = el("rect", {x: left + cell * j, y: rowHeight * i, width: cell - 1, height: rowHeight - 0.5,
                               fill: angleColour(a), stroke: "#ddd", "stroke-width": 0.5}, svg);
        rect.addEventListener("mousemove", function (evt) {
          showTip(evt, name + ", t=" + t + ": " + (a === null ? "n/a" : a.toFixed(3) + "°"));
        });
        rect.addEventListener("mouseleave", hideTip);
      });
    });
    container.appendChild(svg);
  }

  function summaryTable() {
    var table = document.getElementById("summary");
    Object.keys(data.summary).forEach(function (key) {
      var row = table.insertRow();
      row.insertCell().textContent = key.replace(/_/g, " ");
      row.insertCell().textContent = fmt(data.summary[key]);
    });
  }

  function projections() {
    var select = document.getElementById("projection-select");
    var target = document.getElementById("projection");
    data.projections.forEach(function (p, i) {
      var option = document.createElement("option");
      option.value = String(i); option.textContent = p.method.toUpperCase() + " " + p.dims + "D";
      select.appendChild(option);
    });
    function render() {
      target.textContent = "";
      var p = data.projections[Number(select.value)];
      if (p) { (p.dims === 3 ? scatter3d : scatter2d)(target, p); }
    }
    select.addEventListener("change", render);
    render();
  }

  function pts(rows, key) { return rows.map(function (r) { return [r.iteration, r[key]]; }); }
  summaryTable();
  projections();
  var charts = document.getElementById("charts");
  lineChart(charts, [{name: "angle(ΔR_t, Δπ_t+1)", colour: colours.guided, points: pts(data.guided, "angle_deg")}],
            "degrees", [0, 180], 90);
  lineChart(charts, [
    {name: "cos(Δπ_t, Δπ_t+1)", colour: colours.policy, points: pts(data.consecutive, "cosine")},
    {name: "Pearson(ΔR_t, Δπ_t+1)", colour: colours.guided, points: pts(data.guided, "pearson")},
    {name: "Pearson(Δπ_t, Δπ_t+1)", colour: colours.pearson, points: pts(data.consecutive, "pearson")}
  ], "cosine / correlation", [-1.05, 1.05], 0);
  lineChart(charts, ["policy", "reward"].map(function (role) {
    return {name: "‖Δ" + role + "‖", colour: colours[role],
            points: data.norms.filter(function (r) { return r.role === role; }).map(function (r) { return [r.iteration, r.norm]; })};
  }), "update norm");
  layerHeatmap(document.getElementById("layers"), data.layers);
  document.body.setAttribute("data-rendered", "true");
})();
"""


def render_html(metrics: dict, projections: list[Projection], *, title: str = "ZOPrO trajectory analysis") -> str:
    data = page_data(metrics, projections, title)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Policy (blue) and reward model (red) LoRA weights over the run. Hover a point for its
iteration and step. ZOPrO expects ∠(ΔR_t, Δπ_t+1) near 90° and consecutive policy updates to be similar.</p>
<h2>Summary</h2>
<table id="summary"><tr><th>metric</th><th>value</th></tr></table>
<h2>Trajectories</h2>
<div class="panel"><label>projection <select id="projection-select"></select></label><div id="projection"></div></div>
<h2>Over iterations</h2>
<div class="row" id="charts"></div>
<h2>Per tensor: ∠(ΔR_t, Δπ_t+1)</h2>
<p class="note">Rows: tensors (hover for the name); columns: iteration t. White: 90°; blue: aligned; red: opposed.</p>
<div class="panel" id="layers"></div>
<div id="tooltip"></div>
<script type="application/json" id="report-data">{_script_safe_json(data)}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_html(metrics: dict, projections: list[Projection], path, *, title: str = "ZOPrO trajectory analysis") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(metrics, projections, title=title), encoding="utf-8")
    return path
