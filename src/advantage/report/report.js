// Draws the report from the JSON in #report-data. Every node is built with createElement/textContent,
// never innerHTML: trajectory text is untrusted and must stay text.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#7c3aed", "#0d9488", "#db2777", "#ca8a04", "#4b5563"];

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const c of children || []) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(+v.toPrecision(4));
  }

  // ------------------------------------------------------------------ charts
  function niceStep(span, count) {
    const raw = span / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  }

  // Axis range and ticks at round numbers; `integer` keeps steps on whole numbers. Tick labels carry as
  // many decimals as the tick spacing needs, so close ticks never print the same label.
  function domain(values, count, integer) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (lo === hi) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
    let step = niceStep(hi - lo, count);
    if (integer) step = Math.max(1, Math.round(step));
    lo = Math.floor(lo / step + 1e-9) * step;
    hi = Math.ceil(hi / step - 1e-9) * step;
    const digits = Math.min(12, Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
    const big = Math.max(Math.abs(lo), Math.abs(hi)) >= 1e5;
    const label = (v) => (big ? v.toExponential(1) : v.toFixed(digits));
    const ticks = [];
    for (let k = 0; lo + k * step <= hi + step * 1e-6; k++) ticks.push(lo + k * step);
    return { lo, hi, ticks, label };
  }

  function seriesColor(s, i) {
    if (s.kind === "fit") return "var(--fit)";
    if (s.split === "train") return "var(--train)";
    if (s.split === "val") return "var(--val)";
    return PALETTE[i % PALETTE.length];
  }

  // The axes of a chart: x covers its points, its markers and its x_range (the stack shares one); `left`
  // is the margin its y tick labels need.
  function axes(spec, small, yCount) {
    const pts = spec.series.flatMap((s) => s.points);
    const xs = pts.map((p) => p[0]).concat(spec.markers.map((m) => m.x), spec.x_range || []);
    const x = domain(xs, small ? 4 : 6, xs.every(Number.isInteger));
    const y = domain(pts.map((p) => p[1]), yCount, false);
    const widest = Math.max(...y.ticks.map((t) => y.label(t).length));
    return { x, y, left: 30 + widest * 6.5 };
  }

  // opts: small (the grid of other metrics), height, yCount, left (a margin shared down the stack).
  function chart(spec, opts) {
    const small = !!opts.small, W = small ? 360 : 480, H = opts.height || (small ? 200 : 250);
    const { x, y, left } = axes(spec, small, opts.yCount || (small ? 4 : 5));
    const M = { l: opts.left || left, r: 14, t: 10, b: 40 };  // room for the y tick labels and the y label
    const sx = (v) => M.l + ((v - x.lo) / (x.hi - x.lo)) * (W - M.l - M.r);
    const sy = (v) => H - M.b - ((v - y.lo) / (y.hi - y.lo)) * (H - M.t - M.b);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title });
    for (const t of y.ticks) {
      root.appendChild(svg("line", { class: "grid", x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t) }));
      root.appendChild(svg("text", { x: M.l - 6, y: sy(t) + 4, "text-anchor": "end" }, y.label(t)));
    }
    for (const t of x.ticks) {
      root.appendChild(svg("line", { class: "axis", x1: sx(t), x2: sx(t), y1: H - M.b, y2: H - M.b + 4 }));
      root.appendChild(svg("text", { x: sx(t), y: H - M.b + 16, "text-anchor": "middle" }, x.label(t)));
    }
    root.appendChild(svg("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }));
    root.appendChild(svg("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
    root.appendChild(svg("text", { class: "label", x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle" }, spec.x_label));
    const yl = svg("text", { class: "label", x: 0, y: 0, "text-anchor": "middle", transform: `translate(13 ${(M.t + H - M.b) / 2}) rotate(-90)` }, spec.y_label);
    root.appendChild(yl);
    for (const m of spec.markers) {  // under the data: a point on the marked step stays visible
      const mx = sx(m.x), right = mx > W - M.r - 80;
      const g = svg("g", { class: "marker", "data-x": m.x });
      g.appendChild(svg("title", {}, m.title));
      g.appendChild(svg("line", { x1: mx, x2: mx, y1: M.t, y2: H - M.b }));
      g.appendChild(svg("text", { x: right ? mx - 4 : mx + 4, y: M.t + 10, "text-anchor": right ? "end" : "start" }, m.label));
      root.appendChild(g);
    }
    const legend = el("div", { class: "legend" });
    spec.series.forEach((s, i) => {
      const color = seriesColor(s, i);
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)} ${sy(p[1]).toFixed(1)}`).join(" ");
      root.appendChild(svg("path", { class: s.kind === "fit" ? "fitline" : "line", d, stroke: color, "data-series": s.name }));
      if (s.kind !== "fit") {
        for (const p of s.points) {
          const c = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color });
          c.appendChild(svg("title", {}, `${s.name}  step ${fmt(p[0])}: ${fmt(p[1])}`));
          root.appendChild(c);
        }
      }
      const swatch = el("i");
      swatch.style.background = color;
      legend.appendChild(el("span", {}, [swatch, s.name]));
    });
    return el("div", { class: "chart" + (spec.stacked ? " stacked" : "") }, [el("h3", { text: spec.title }), root, legend]);
  }

  // The reward on top and the panels under it share one x range (set in the data) and one left margin,
  // so the same step lines up down the stack.
  function stack(specs) {
    const opts = specs.map((s, i) => (i === 0 && s.title === "Reward" ? {} : { height: 150, yCount: 3 }));
    const left = Math.max(...specs.map((s, i) => axes(s, false, opts[i].yCount || 5).left));
    return el("div", { class: "stack" }, specs.map((s, i) => chart(s, { ...opts[i], left })));
  }

  function renderCurves() {
    const fit = document.getElementById("fit");
    fit.textContent = (DATA.fit.ok ? "ScaleRL ceiling fit of train reward vs step (dashed on the reward chart, out to 2× the steps so far): " : "") + DATA.fit.message;
    if (!DATA.fit.ok) fit.classList.add(DATA.fit.rising ? "failed" : "warn");
    const best = document.getElementById("best");
    if (DATA.best) { best.textContent = DATA.best.message + " Marked on the charts below."; best.hidden = false; }
    const head = document.getElementById("headline"), other = document.getElementById("other");
    const stacked = DATA.charts.filter((c) => c.stacked);
    if (stacked.length) head.appendChild(stack(stacked));
    for (const spec of DATA.charts.filter((c) => !c.stacked)) (spec.headline ? head : other).appendChild(chart(spec, { small: !spec.headline }));
    if (!DATA.charts.length) head.appendChild(el("div", { class: "empty", text: "metrics.jsonl holds no numeric metrics yet." }));
    if (!other.childNodes.length) document.getElementById("other-metrics").hidden = true;
  }

  // ------------------------------------------------------------------ trajectory viewer
  const state = { split: null, step: null, group: 0, mode: "best-worst", selected: null };
  const splits = Object.keys(DATA.trajectories).sort((a, b) => (a === "train" ? -1 : b === "train" ? 1 : a.localeCompare(b)));

  function steps() { return Object.keys(DATA.trajectories[state.split] || {}).sort((a, b) => a - b); }
  function groups() { return ((DATA.trajectories[state.split] || {})[state.step]) || []; }
  function group() { return groups()[state.group] || null; }
  function ranked(g) {  // member indices, best reward first
    return g.trajectories.map((t, i) => i).sort((a, b) => (g.trajectories[b].reward ?? -Infinity) - (g.trajectories[a].reward ?? -Infinity));
  }
  function mean(xs) { return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null; }

  function fillSelect(sel, values, current, label) {
    sel.replaceChildren(...values.map((v) => { const o = el("option", { value: v, text: label(v) }); o.selected = v === current; return o; }));
  }

  function renderControls() {
    fillSelect(document.getElementById("split"), splits, state.split, (v) => v);
    fillSelect(document.getElementById("step"), steps(), state.step, (v) => `step ${v}`);
    const omitted = DATA.omitted_steps[state.split] || 0;
    document.getElementById("omitted").textContent = omitted ? `${omitted} steps left out (see --max-steps)` : "";
  }

  function renderGroups() {
    const box = document.getElementById("groups");
    box.replaceChildren(...groups().map((g, i) => {
      const rs = g.trajectories.map((t) => t.reward).filter((r) => r !== null);
      const label = `group ${g.index} · mean ${fmt(mean(rs))} · ${fmt(rs.length ? Math.min(...rs) : null)}–${fmt(rs.length ? Math.max(...rs) : null)}`;
      return el("button", { type: "button", class: i === state.group ? "active" : "", onclick: () => { state.group = i; state.selected = null; renderViewer(); } }, [label]);
    }));
    if (!groups().length) box.appendChild(el("div", { class: "empty", text: "No trajectories logged for this split and step." }));
    const g = group(), exc = document.getElementById("group-exceptions");
    exc.replaceChildren();
    if (g && g.exceptions.length) {
      exc.appendChild(el("details", { class: "exceptions" }, [el("summary", { text: `${g.exceptions.length} rollout(s) in this group raised` }), ...g.exceptions.map((e) => el("pre", { text: e }))]));
    }
  }

  function renderMembers() {
    const table = document.getElementById("members"), g = group();
    table.replaceChildren();
    if (!g) return;
    const metricNames = [...new Set(g.trajectories.flatMap((t) => Object.keys(t.metrics)))].slice(0, 8);
    table.appendChild(el("tr", {}, ["rank", "member", "reward", "finish", "messages", ...metricNames, "logs"].map((h) => el("th", { text: h }))));
    ranked(g).forEach((i, rank) => {
      const t = g.trajectories[i];
      const lastLog = t.logs.length ? t.logs[t.logs.length - 1] : "";
      const row = el("tr", { class: "member-row" + (state.mode === "single" && state.selected === i ? " active" : ""), "data-member": i, onclick: () => { state.selected = i; state.mode = "single"; renderViewer(); } }, [
        el("td", { text: String(rank + 1) }), el("td", { text: `#${i}` }), el("td", { class: "reward", text: fmt(t.reward) }),
        el("td", { text: t.finish_reason || "–" }), el("td", { text: String(t.messages.length) }),
        ...metricNames.map((m) => el("td", { text: fmt(t.metrics[m]) })),
        el("td", { class: "wrap", text: lastLog.length > 90 ? lastLog.slice(0, 90) + "…" : lastLog }),
      ]);
      table.appendChild(row);
    });
  }

  function prettyArgs(args) {  // one line when short, indented when long, as written when not JSON
    try {
      const parsed = JSON.parse(args), flat = JSON.stringify(parsed);
      return flat.length <= 100 ? flat : JSON.stringify(parsed, null, 1);
    } catch (e) { return args; }
  }

  function message(m) {
    const who = el("div", { class: "who" }, [m.role, m.sampled ? el("span", { class: "badge", text: m.weights_step === null ? "sampled" : `sampled · weights step ${m.weights_step}` }) : null, m.tool_call_id ? el("span", { class: "muted", text: `  ${m.tool_call_id}` }) : null]);
    const body = [who];
    if (m.content) body.push(el("pre", { class: "content", text: m.content }));
    for (const tc of m.tool_calls) body.push(el("div", { class: "toolcall" }, [el("span", { class: "fn", text: `→ ${tc.name} ` }), el("pre", { text: prettyArgs(tc.arguments) })]));
    if (!m.content && !m.tool_calls.length) body.push(el("div", { class: "empty", text: "(empty)" }));
    return el("div", { class: `msg role-${/^[a-z]+$/.test(m.role) ? m.role : "other"}` + (m.sampled ? " sampled" : "") }, body);
  }

  // The context before the first sampled turn (system prompt, few-shot examples) folds away, up to the
  // last user message before it: the question the policy answers stays in view.
  function messages(ms) {
    const first = ms.findIndex((m) => m.sampled);
    let keep = first;
    while (keep > 0 && ms[keep - 1].role !== "user") keep--;
    keep = keep > 0 ? keep - 1 : 0;  // no user message before it: fold nothing
    if (keep < 1) return ms.map(message);
    const folded = el("details", { class: "context" }, [el("summary", { text: `${keep} earlier context message(s)` }), ...ms.slice(0, keep).map(message)]);
    return [folded, ...ms.slice(keep).map(message)];
  }

  function pane(g, i, heading) {
    const t = g.trajectories[i];
    const kv = Object.entries(t.metrics).map(([k, v]) => el("span", { text: `${k}: ${fmt(v)}` }));
    const parts = [
      el("h3", {}, [`${heading} · member #${i} · reward `, el("span", { class: "reward", text: fmt(t.reward) })]),
      el("div", { class: "muted", text: `finish: ${t.finish_reason || "–"}` + (t.tools.length ? ` · tools: ${t.tools.join(", ")}` : "") }),
      kv.length ? el("div", { class: "kv" }, kv) : null,
      t.logs.length ? el("div", { class: "logs" }, [el("b", { text: "Logs (judge explanations)" }), ...t.logs.map((l) => el("div", { text: l }))]) : null,
      ...messages(t.messages),
      el("details", {}, [el("summary", { text: "metadata" }), el("pre", { text: t.metadata })]),
    ];
    return el("div", { class: "pane", "data-member": i }, parts);
  }

  function renderPanes() {
    const box = document.getElementById("panes"), g = group();
    box.replaceChildren();
    for (const b of document.querySelectorAll(".modes button")) b.classList.toggle("active", b.dataset.mode === state.mode);
    if (!g || !g.trajectories.length) return;
    const order = ranked(g);
    if (state.mode === "single") {
      const i = state.selected ?? order[0];
      box.appendChild(pane(g, i, `rank ${order.indexOf(i) + 1} of ${order.length}`));
    } else if (state.mode === "best-worst") {
      box.appendChild(pane(g, order[0], "best"));
      if (order.length > 1) box.appendChild(pane(g, order[order.length - 1], "worst"));
    } else {
      order.forEach((i, r) => box.appendChild(pane(g, i, `rank ${r + 1}`)));
    }
  }

  function renderViewer() {
    renderControls();
    renderGroups();
    renderMembers();
    renderPanes();
  }

  function initViewer() {
    if (!splits.length) {
      for (const sel of ["#viewer .controls", "#viewer .modes"]) document.querySelector(sel).hidden = true;
      document.getElementById("viewer").appendChild(el("div", { class: "empty", text: "No trajectories were logged for this run." }));
      return;
    }
    state.split = splits[0];
    state.step = steps()[steps().length - 1];
    document.getElementById("split").addEventListener("change", (e) => {
      state.split = e.target.value; const s = steps(); state.step = s[s.length - 1]; state.group = 0; state.selected = null; renderViewer();
    });
    document.getElementById("step").addEventListener("change", (e) => { state.step = e.target.value; state.group = 0; state.selected = null; renderViewer(); });
    for (const b of document.querySelectorAll(".modes button")) {
      b.addEventListener("click", () => { state.mode = b.dataset.mode; renderViewer(); });
    }
    renderViewer();
  }

  document.getElementById("title").textContent = DATA.title;
  document.getElementById("subtitle").textContent = `${DATA.run_dir} · ${DATA.n_rows} metric rows · generated ${DATA.generated}`;
  renderCurves();
  initViewer();
})();
