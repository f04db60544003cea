/* Feature dashboard: the index (density histogram, a table that sorts, filters and searches) and one view per
   feature (hash route #f=ID), whose data shard is loaded on demand with a <script> tag. */
"use strict";
var DASH = {
  data: {},
  put: function (name, value) { DASH.data[name] = value; },
  state: {sort: "density", asc: false, limit: 100, query: "", minD: "", maxD: ""}
};

DASH.el = function (tag, attrs, children) {
  var e = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (k) {
    if (k === "text") e.textContent = attrs[k]; else if (k === "class") e.className = attrs[k];
    else e.setAttribute(k, attrs[k]);
  });
  (children || []).forEach(function (c) { if (c) e.appendChild(c); });
  return e;
};
DASH.tok = function (id) {
  var s = id < 0 ? "" : (DASH.data.vocab[id] !== undefined ? DASH.data.vocab[id] : "<" + id + ">");
  return s.replace(/\n/g, "\u23CE");
};
DASH.fmt = function (x) { return x === 0 ? "0" : (Math.abs(x) >= 0.01 && Math.abs(x) < 1e4 ? x.toFixed(3) : x.toExponential(2)); };

DASH.start = function () {
  var m = DASH.data.meta, h = document.getElementById("identity");
  h.innerHTML = "";
  h.appendChild(DASH.el("h1", {}, [DASH.el("a", {href: "#", text: m.name})]));
  var parts = ["model " + (m.model || "?"), "hook " + (m.hook || "?"), (m.architecture || "") + " " + m.d_in +
               " \u2192 " + m.d_dict, m.features + " features shown from " + m.first, m.tokens + " tokens"];
  h.appendChild(DASH.el("div", {class: "muted", text: parts.join(" \u00B7 ")}));
  window.addEventListener("hashchange", DASH.route);
  DASH.route();
};

DASH.route = function () {
  var match = /f=(\d+)/.exec(location.hash);
  if (match) DASH.feature(parseInt(match[1], 10)); else DASH.index();
};

/* ---- index ---------------------------------------------------------------------------------------- */
DASH.histogram = function (values, lo, step, bins, label) {
  var counts = new Array(bins).fill(0), w = 520, h = 110;
  values.forEach(function (v) { var i = Math.floor((v - lo) / step); if (i >= 0 && i < bins) counts[i] += 1; });
  return DASH.bars(counts, lo, step, label, w, h);
};
DASH.bars = function (counts, lo, step, label, w, h) {
  var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg"), top = Math.max.apply(null, counts) || 1;
  svg.setAttribute("width", w); svg.setAttribute("height", h + 24);
  var bw = (w - 30) / counts.length;
  counts.forEach(function (c, i) {
    var r = document.createElementNS(ns, "rect"), bh = c ? Math.max(1, h * c / top) : 0;
    r.setAttribute("class", "bar"); r.setAttribute("x", 30 + i * bw); r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("y", h - bh); r.setAttribute("height", bh);
    var t = document.createElementNS(ns, "title"); t.textContent = c + " at " + (lo + i * step).toFixed(2);
    r.appendChild(t); svg.appendChild(r);
  });
  [0, counts.length].forEach(function (i) {
    var t = document.createElementNS(ns, "text"); t.setAttribute("x", 30 + i * bw - (i ? 24 : 0)); t.setAttribute("y", h + 12);
    t.textContent = (lo + i * step).toFixed(1); svg.appendChild(t);
  });
  var t = document.createElementNS(ns, "text"); t.setAttribute("x", 30 + w / 3); t.setAttribute("y", h + 22);
  t.textContent = label; svg.appendChild(t);
  var top_ = document.createElementNS(ns, "text"); top_.setAttribute("x", 0); top_.setAttribute("y", 10);
  top_.textContent = top; svg.appendChild(top_);
  return svg;
};

DASH.rows = function () {
  var idx = DASH.data.index, m = DASH.data.meta, s = DASH.state, q = s.query.trim(), rows = [];
  var minD = s.minD === "" ? -Infinity : parseFloat(s.minD), maxD = s.maxD === "" ? Infinity : parseFloat(s.maxD);
  for (var r = 0; r < idx.density.length; r++) {
    var id = m.first + r, d = idx.density[r], ld = d > 0 ? Math.log10(d) : -10;
    if (ld < minD || ld > maxD) continue;
    var toks = idx.top[r].map(DASH.tok);
    if (q) {
      var asId = /^#?\d+$/.test(q) && parseInt(q.replace("#", ""), 10) === id;
      var asTok = toks.some(function (t) { return t.toLowerCase().indexOf(q.toLowerCase()) >= 0; });
      if (!asId && !asTok) continue;
    }
    rows.push({id: id, density: d, max: idx.max[r], mean: idx.mean[r], tokens: toks});
  }
  rows.sort(function (a, b) { var x = a[s.sort], y = b[s.sort]; return (x < y ? -1 : x > y ? 1 : 0) * (s.asc ? 1 : -1); });
  return rows;
};

DASH.index = function () {
  var view = document.getElementById("view"), idx = DASH.data.index, s = DASH.state;
  view.innerHTML = "";
  var logs = idx.density.map(function (d) { return d > 0 ? Math.log10(d) : -9.99; });
  var dead = idx.density.filter(function (d) { return d === 0; }).length;
  view.appendChild(DASH.el("h2", {text: "Feature density (" + dead + " dead of " + idx.density.length + ")"}));
  view.appendChild(DASH.histogram(logs, -10, 0.25, 40, "log10 density (dead at -10)"));
  var search = DASH.el("input", {id: "search", placeholder: "feature id or token", value: s.query});
  var minD = DASH.el("input", {id: "min-density", size: 5, placeholder: "-10", value: s.minD});
  var maxD = DASH.el("input", {id: "max-density", size: 5, placeholder: "0", value: s.maxD});
  view.appendChild(DASH.el("div", {class: "controls"}, [DASH.el("label", {text: "Search "}, [search]),
    DASH.el("label", {text: "log10 density from "}, [minD]), DASH.el("label", {text: " to "}, [maxD])]));
  var table = DASH.el("table", {id: "features"}), holder = DASH.el("div");
  view.appendChild(table); view.appendChild(holder);
  var draw = function () {
    var rows = DASH.rows(), cols = [["id", "feature"], ["density", "density"], ["max", "max act."],
                                    ["mean", "mean act."], ["tokens", "top tokens"]];
    table.innerHTML = "";
    table.appendChild(DASH.el("tr", {}, cols.map(function (c) {
      var th = DASH.el("th", {text: c[1], "data-key": c[0], class: s.sort === c[0] ? "sorted" + (s.asc ? " asc" : "") : ""});
      th.onclick = function () { if (c[0] === "tokens") return; s.asc = s.sort === c[0] ? !s.asc : false; s.sort = c[0]; draw(); };
      return th;
    })));
    rows.slice(0, s.limit).forEach(function (r) {
      table.appendChild(DASH.el("tr", {class: "row", "data-id": r.id}, [
        DASH.el("td", {}, [DASH.el("a", {href: "#f=" + r.id, text: "#" + r.id})]),
        DASH.el("td", {text: r.density.toExponential(2)}), DASH.el("td", {text: DASH.fmt(r.max)}),
        DASH.el("td", {text: DASH.fmt(r.mean)}),
        DASH.el("td", {class: "tokens", text: r.tokens.map(function (t) { return JSON.stringify(t); }).join("  ")})]));
    });
    holder.innerHTML = "";
    holder.appendChild(DASH.el("p", {class: "muted", id: "count", text: "showing " + Math.min(s.limit, rows.length) + " of " + rows.length}));
    if (rows.length > s.limit) {
      var more = DASH.el("button", {text: "show more"}); more.onclick = function () { s.limit += 500; draw(); };
      holder.appendChild(more);
    }
  };
  search.oninput = function () { s.query = search.value; s.limit = 100; draw(); };
  minD.oninput = function () { s.minD = minD.value; draw(); };
  maxD.oninput = function () { s.maxD = maxD.value; draw(); };
  draw();
};

/* ---- one feature ---------------------------------------------------------------------------------- */
DASH.load = function (name, done) {
  if (DASH.data[name]) { done(); return; }
  var s = document.createElement("script");
  s.src = "data/" + name + ".js"; s.onload = done;
  s.onerror = function () { document.getElementById("view").textContent = "could not load data/" + name + ".js"; };
  document.head.appendChild(s);
};

DASH.feature = function (id) {
  var m = DASH.data.meta, view = document.getElementById("view");
  if (id < m.first || id >= m.first + m.features) { view.textContent = "feature " + id + " is not in this dashboard"; return; }
  var name = "shard_" + ("000" + Math.floor((id - m.first) / m.shard)).slice(-4);
  view.textContent = "loading feature " + id + "\u2026";
  DASH.load(name, function () {
    var shard = DASH.data[name];
    DASH.renderFeature(id, shard.features[id - shard.first]);
  });
};

DASH.context = function (ex, max) {
  var div = DASH.el("div", {class: "context", "data-act": ex[0]});
  div.appendChild(DASH.el("span", {class: "act", text: DASH.fmt(ex[0])}));
  ex[2].forEach(function (id, i) {
    var q = ex[3][i], span = DASH.el("span", {class: "tok" + (i === ex[1] ? " marked" : ""), text: DASH.tok(id),
                                             title: (q * max / 255).toPrecision(3)});
    span.style.backgroundColor = "rgba(255, 110, 0, " + (q / 255).toFixed(3) + ")";
    div.appendChild(span);
  });
  return div;
};

DASH.renderFeature = function (id, f) {
  var m = DASH.data.meta, view = document.getElementById("view"), idx = DASH.data.index.density[id - m.first];
  view.innerHTML = "";
  var title = DASH.el("h2", {id: "feature-title", text: "Feature " + id});
  view.appendChild(DASH.el("p", {}, [DASH.el("a", {href: "#", text: "\u2190 all features"})]));
  view.appendChild(title);
  var facts = "fires on " + f.n + " of " + m.tokens + " tokens (density " + idx.toExponential(2) + "), max activation " + DASH.fmt(f.max);
  view.appendChild(DASH.el("p", {class: "muted", text: facts + " \u00B7 " + m.name + " \u00B7 " + (m.model || "?") + " \u00B7 " + (m.hook || "?")}));
  if (m.neuronpedia) view.appendChild(DASH.el("p", {}, [DASH.el("a", {id: "neuronpedia", href: "https://www.neuronpedia.org/" + m.neuronpedia + "/" + id, text: "this feature on Neuronpedia"})]));
  if (f.hist.length > 1) {
    var h = m.hist, lo = h[0] + f.hist[0] / h[1];
    view.appendChild(DASH.el("h2", {text: "Activation histogram"}));
    view.appendChild(DASH.bars(f.hist.slice(1), lo, 1 / h[1], "log10 activation", 520, 90));
  }
  var top = DASH.el("div", {id: "top-contexts"});
  f.top.forEach(function (ex) { top.appendChild(DASH.context(ex, f.max)); });
  view.appendChild(DASH.el("h2", {text: "Top activations"})); view.appendChild(top);
  var samples = DASH.el("div", {id: "samples"}), n = f.samples.length, bands = 3;
  for (var b = 0; b < bands && n; b++) {
    var part = f.samples.slice(Math.floor(b * n / bands), Math.floor((b + 1) * n / bands));
    if (!part.length) continue;
    samples.appendChild(DASH.el("h3", {class: "muted", text: ["upper", "middle", "lower"][b] + " third of a uniform sample of firings (" +
      DASH.fmt(part[part.length - 1][0]) + " \u2013 " + DASH.fmt(part[0][0]) + ")"}));
    part.forEach(function (ex) { samples.appendChild(DASH.context(ex, f.max)); });
  }
  view.appendChild(DASH.el("h2", {text: "Samples across activation quantiles"})); view.appendChild(samples);
  var lens = function (label, list) {
    return DASH.el("div", {class: "lens"}, [DASH.el("h2", {text: label})].concat((list || []).map(function (p) {
      return DASH.el("span", {text: JSON.stringify(DASH.tok(p[0])) + " " + (p[1] > 0 ? "+" : "") + p[1]});
    })));
  };
  var near = DASH.el("div", {id: "nearest"}, [DASH.el("h2", {text: "Nearest features (decoder cosine)"})].concat(
    (f.near || []).map(function (p) { return DASH.el("div", {}, [DASH.el("a", {href: "#f=" + p[0], text: "#" + p[0]}), DASH.el("span", {text: " " + p[1]})]); })));
  view.appendChild(DASH.el("div", {class: "cols"}, [lens("Promoted tokens (logit lens)", f.promoted),
                                                     lens("Suppressed tokens", f.suppressed), near]));
  window.scrollTo(0, 0);
};
