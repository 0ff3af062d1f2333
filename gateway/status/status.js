"use strict";
// The status page: renders /status/api/summary (embedded at load, then polled) into tiles, SVG
// charts and tables. Every text from the gateway goes in through textContent, never as markup.
(() => {
  const S = JSON.parse(document.getElementById("tg-strings").textContent);
  const CSRF = document.querySelector('meta[name="csrf-token"]').content;
  const SVG = "http://www.w3.org/2000/svg";
  const REASONS = ["signature", "auth", "size", "rate_limit", "malformed"];
  const COLORS = { stored: "var(--stored)", rejected: "var(--rejected)", retry: "var(--retry)" };
  let current = JSON.parse(document.getElementById("tg-initial").textContent);
  let timer = null;

  const t = (key, params) =>
    (S[key] || key).replace(/\{(\w+)\}/g, (_, name) => (params && name in params ? String(params[name]) : ""));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "cls") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const child of children) node.append(child);
    return node;
  }

  const number = new Intl.NumberFormat(S.lang === "zh" ? "zh-CN" : "en");
  const percent = new Intl.NumberFormat(S.lang === "zh" ? "zh-CN" : "en", { style: "percent", maximumFractionDigits: 1 });
  const relative = new Intl.RelativeTimeFormat(S.lang === "zh" ? "zh-CN" : "en", { numeric: "auto" });
  const clock = new Intl.DateTimeFormat(S.lang === "zh" ? "zh-CN" : "en", { hour: "2-digit", minute: "2-digit" });
  const stamp = new Intl.DateTimeFormat(S.lang === "zh" ? "zh-CN" : "en",
    { dateStyle: "short", timeStyle: "medium" });

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return `${number.format(Math.round(seconds * 1000 * 10) / 10)} ms`;
    if (seconds < 120) return `${number.format(Math.round(seconds * 10) / 10)} s`;
    if (seconds < 7200) return `${number.format(Math.round(seconds / 60))} min`;
    return `${number.format(Math.round(seconds / 360) / 10)} h`;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${number.format(Math.round(n * 10) / 10)} ${units[i]}`;
  }
  function ago(iso) {
    if (!iso) return t("never");
    const seconds = (Date.parse(iso) - Date.now()) / 1000;
    const abs = Math.abs(seconds);
    if (abs < 60) return relative.format(Math.round(seconds), "second");
    if (abs < 3600) return relative.format(Math.round(seconds / 60), "minute");
    if (abs < 86400) return relative.format(Math.round(seconds / 3600), "hour");
    return relative.format(Math.round(seconds / 86400), "day");
  }

  function tile(label, value, cls, detail, id) {
    return el("div", { cls: "tile", id },
      el("div", { cls: "label", text: label }),
      el("div", { cls: `value ${cls || ""}`, text: value }),
      el("div", { cls: "detail", text: detail || "" }));
  }

  function overview(d) {
    const box = document.getElementById("tg-overview");
    const b = d.broker, o = d.outbox, st = d.store, q = d.quarantine;
    const brokerDetail = b.connected ? `${b.address} · ${b.exchange}`
      : `${b.address}${b.last_error ? ` · ${b.last_error}` : ""}`;
    const aging = o.oldest_age !== null && o.oldest_age > 60;
    const tiles = [
      tile(t("broker"), b.connected ? t("connected") : t("disconnected"), b.connected ? "ok" : "bad", brokerDetail, "tg-broker"),
      tile(t("store"), st.ok ? t("store_ok") : t("store_problem"), st.ok ? "ok" : "bad",
        `${st.problem ? `${st.problem} · ` : ""}${st.backend}${st.size_bytes !== null ? ` · ${bytes(st.size_bytes)}` : ""}`, "tg-store"),
      tile(`${t("outbox")} · ${t("backlog")}`, number.format(o.backlog), o.backlog === 0 ? "ok" : aging ? "bad" : "warn",
        `${o.oldest_age !== null ? t("oldest", { age: duration(o.oldest_age) }) + " · " : ""}${t("of_bound", { bound: number.format(o.bound) })} · ${t("published")} ${number.format(o.published_total)}`,
        "tg-outbox"),
      tile(`${t("quarantine")} · ${t("held")}`, number.format(q.held), q.held ? "warn" : "ok",
        t("q_total", { total: number.format(q.total), replayed: number.format(q.total - q.held) }), "tg-q-tile"),
    ];
    if (d.replies) {
      const r = d.replies;
      const waitingAge = r.oldest_waiting_age !== null ? t("oldest", { age: duration(r.oldest_waiting_age) }) : "";
      tiles.push(tile(`${t("replies")} · ${t("replies_waiting")}`, number.format(r.waiting),
        r.waiting ? (r.oldest_waiting_age > 300 ? "bad" : "warn") : "ok", waitingAge, "tg-replies-waiting"));
      const reasons = Object.entries(r.failed_by_reason).map(([k, v]) => `${k} ${number.format(v)}`).join(" · ");
      tiles.push(tile(`${t("replies")} · ${t("replies_failed")}`, number.format(r.failed), r.failed ? "bad" : "ok",
        reasons || t("replies_since", { sent: number.format(r.sent), failed: number.format(r.failed) }),
        "tg-replies-failed"));
    }
    box.replaceChildren(...tiles);
  }

  // 60 stacked bars, one a minute, oldest on the left: stored, refused, retry.
  function chart(row, channel) {
    const m = row.minutes, n = m.stored.length, w = 4, h = 36, axis = 11;
    const totals = m.stored.map((v, i) => v + m.rejected[i] + m.retry[i]);
    const max = Math.max(1, ...totals);
    const sum = totals.reduce((a, b) => a + b, 0);
    const root = svg("svg", {
      class: "chart", width: n * w, height: h + 1 + axis, viewBox: `0 0 ${n * w} ${h + 1 + axis}`, role: "img",
      "data-total": sum, "data-stored": m.stored.reduce((a, b) => a + b, 0),
      "data-channel": channel, "data-inbox": row.inbox,
      "aria-label": `${channel}/${row.inbox || "-"}: ${sum} ${t("last_hour")}`,
    });
    root.append(svg("line", { x1: 0, x2: n * w, y1: h + 0.5, y2: h + 0.5, stroke: "var(--line)" }));
    for (const [x, anchor, key] of [[0, "start", "chart_start"], [n * w, "end", "chart_end"]]) {
      const label = svg("text", { x, y: h + axis, "text-anchor": anchor, "font-size": 9, fill: "var(--muted)" });
      label.textContent = t(key);
      root.append(label);
    }
    const end = row.minute_end * 1000;
    totals.forEach((total, i) => {
      if (!total) return;
      const minute = new Date(end - (n - i) * 60000);
      const g = svg("g", {}, svg("title", {}));
      g.firstChild.textContent = `${clock.format(minute)} · ${t("stored")} ${m.stored[i]} · ${t("rejected")} ${m.rejected[i]} · ${t("retry")} ${m.retry[i]}`;
      let y = h;
      for (const key of ["stored", "rejected", "retry"]) {
        const value = m[key][i];
        if (!value) continue;
        const height = Math.max(1, (value / max) * h);
        y -= height;
        g.append(svg("rect", { x: i * w, y, width: w - 1, height, fill: COLORS[key], "data-kind": key }));
      }
      root.append(g);
    });
    return root;
  }

  // Ack latency against the provider's deadline: a bar to the deadline (log scale), p50 and p99 on it.
  function latency(ch) {
    const a = ch.ack, width = 160, deadline = ch.deadline;
    const scale = (v) => Math.min(width, (Math.log10(1 + v * 1000) / Math.log10(1 + deadline * 1000)) * width);
    const box = el("div", { cls: "latency" },
      el("div", { cls: "muted", text: t("deadline", { deadline: duration(deadline) }) }));
    if (!a.count) { box.append(el("div", { cls: "muted", text: t("no_acks") })); return box; }
    const root = svg("svg", { width: width + 2, height: 14, role: "img", "data-p99": a.p99 ?? "",
      "aria-label": `p50 ${duration(a.p50)}, p99 ${duration(a.p99)} / ${duration(deadline)}` });
    root.append(svg("rect", { x: 0, y: 4, width, height: 6, rx: 3, fill: "var(--line)" }));
    const p99 = a.p99 ?? 0;
    root.append(svg("rect", { x: 0, y: 4, width: Math.max(2, scale(p99)), height: 6, rx: 3,
      fill: p99 > deadline ? "var(--bad)" : p99 > deadline / 2 ? "var(--warn)" : "var(--ok)" }));
    if (a.p50 !== null) root.append(svg("rect", { x: scale(a.p50), y: 1, width: 2, height: 12, fill: "var(--text)" }));
    root.append(svg("rect", { x: width, y: 0, width: 2, height: 14, fill: "var(--bad)" }));
    box.append(root);
    const share = a.share_within === null ? "–" : percent.format(a.share_within);
    box.append(el("div", { cls: a.share_within !== null && a.share_within < 0.99 ? "bad" : "",
      text: `p50 ${duration(a.p50)} · p99 ${duration(a.p99)} · ${t("in_time", { share })}` }));
    if (a.worst_last_hour !== null) {
      box.append(el("div", { cls: "muted", text: t("worst_hour", { value: duration(a.worst_last_hour) }) }));
    }
    return box;
  }

  // Refusals of one inbox by reason: since start, and the last hour in brackets; only the nonzero.
  function refusals(row) {
    const cell = el("td", { cls: "refusals", title: t("refusals_title") });
    for (const reason of REASONS) {
      const total = row.refusals[reason] || 0;
      const hour = (row.refusals_last_hour || {})[reason] || 0;
      if (!total && !hour) continue;
      cell.append(el("span", { cls: "refusal", "data-reason": reason, "data-total": total },
        el("span", { text: t(`reason_${reason}`) }), " ", el("b", { text: number.format(total) }),
        hour ? el("span", { cls: "muted", text: ` (${number.format(hour)})` }) : null));
    }
    if (!cell.childNodes.length) cell.append(el("span", { cls: "muted", text: "–" }));
    return cell;
  }

  function channelCell(ch, d) {
    const totals = Object.entries(ch.totals).filter(([, v]) => v)
      .map(([k, v]) => `${t(`outcome_${k}`)} ${number.format(v)}`).join(" · ");
    const cell = el("td", { cls: "ch" }, el("div", { cls: "name", text: ch.name }),
      el("div", { cls: "muted", text: totals }));
    const sent = (d.replies.sent_by_channel || {})[ch.name] || 0;
    const failed = (d.replies.failed_by_channel || {})[ch.name] || 0;
    if (sent || failed) {
      cell.append(el("div", { cls: failed ? "bad" : "muted",
        text: `${t("replies")}: ${t("replies_sent")} ${number.format(sent)} · ${t("replies_failed")} ${number.format(failed)}` }));
    }
    return cell;
  }

  // One table: a row per inbox, the channel's name and ack latency spanning its inboxes.
  function channels(d) {
    const box = document.getElementById("tg-channels");
    if (!d.channels.length) { box.replaceChildren(el("p", { cls: "muted", text: t("no_channels") })); return; }
    const head = el("tr", {}, ...["channel", "ack", "inbox", "messages_hour", "last_hour", "last_message", "refusals"]
      .map((key) => el("th", { cls: `h-${key}`, text: t(key) })));
    const table = el("table", { cls: "channels" }, el("thead", {}, head));
    for (const ch of d.channels) {
      const group = el("tbody", { id: `tg-channel-${ch.name}`, "data-channel": ch.name });
      const rows = ch.inboxes.length ? ch.inboxes : [null];
      rows.forEach((row, i) => {
        const tr = el("tr", { "data-channel": ch.name, "data-inbox": row ? row.inbox : null });
        if (i === 0) {
          const name = channelCell(ch, d);
          const ack = el("td", { cls: "ack" }, latency(ch));
          name.rowSpan = ack.rowSpan = rows.length;
          tr.append(name, ack);
        }
        if (row === null) {
          tr.append(el("td", { colspan: 5, cls: "muted", text: "–" }));
        } else {
          const hour = Object.values(row.last_hour).reduce((a, b) => a + b, 0);
          const label = row.inbox ? `${row.inbox}${row.name ? ` · ${row.name}` : ""}` : t("no_inbox");
          tr.append(el("td", { cls: "inbox", text: label }), el("td", { cls: "chart-cell" }, chart(row, ch.name)),
            el("td", { cls: "count", text: number.format(hour) }),
            el("td", { title: row.last_message_at ? stamp.format(new Date(row.last_message_at)) : null,
              cls: "last", text: ago(row.last_message_at) }),
            refusals(row));
        }
        group.append(tr);
      });
      table.append(group);
    }
    const legend = el("div", { cls: "legend" }, el("i", { cls: "stored" }), t("stored"),
      el("i", { cls: "rejected" }), t("rejected"), el("i", { cls: "retry" }), t("retry"),
      el("span", { text: ` · ${t("refusals_title")}` }));
    box.replaceChildren(el("div", { cls: "card scroll" }, table, legend));
  }

  async function api(path, options) {
    const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json",
      ...(options && options.body ? { "Content-Type": "application/json", "X-CSRF-Token": CSRF } : {}) },
      ...options });
    if (response.status === 401) { window.location.assign(`/status/login?lang=${S.lang}`); throw new Error("401"); }
    const body = await response.json();
    if (!response.ok) throw new Error(body.reason || response.statusText);
    return body;
  }

  async function showItem(id) {
    const info = await api(`/status/api/quarantine/${encodeURIComponent(id)}`);
    document.getElementById("tg-show-title").textContent = info.id;
    const fields = document.getElementById("tg-show-fields");
    fields.replaceChildren();
    for (const key of ["channel", "inbox", "tenant", "reason", "received_at", "size", "content_type",
      "raw_ref", "replayed_at", "replay_result"]) {
      if (info[key] === null || info[key] === undefined) continue;
      fields.append(el("dt", { text: key }), el("dd", { text: String(info[key]) }));
    }
    document.getElementById("tg-show-download").href = `/status/api/quarantine/${encodeURIComponent(id)}/raw`;
    document.getElementById("tg-show-raw-title").textContent = t("q_raw", { n: info.raw_preview_bytes });
    document.getElementById("tg-show-raw").textContent = info.raw_preview;
    document.getElementById("tg-show").showModal();
  }

  function askReplay(item) {
    const dialog = document.getElementById("tg-confirm");
    document.getElementById("tg-confirm-what").textContent = `${item.id} · ${item.channel}/${item.inbox} · ${item.reason}`;
    document.getElementById("tg-confirm-text").textContent = t("confirm_text", { id: item.id });
    dialog.returnValue = "";
    dialog.onclose = async () => {
      if (dialog.returnValue !== "replay") return;
      const result = document.getElementById("tg-q-result");
      try {
        const r = await api(`/status/api/quarantine/${encodeURIComponent(item.id)}/replay`,
          { method: "POST", body: JSON.stringify({ confirm: item.id }) });
        result.textContent = t(r.stored ? "replayed" : "replay_failed", { id: r.id, summary: r.summary });
        result.className = r.stored ? "ok" : "bad";
      } catch (error) {
        result.textContent = t("error", { reason: error.message });
        result.className = "bad";
      }
      refresh();
    };
    dialog.showModal();
  }

  function quarantine(d) {
    const q = d.quarantine;
    document.getElementById("tg-q-note").textContent =
      q.total > q.items.length ? `(${t("q_shown", { n: q.shown })}; ticketgate quarantine list)` : "";
    const box = document.getElementById("tg-quarantine");
    if (!q.items.length) { box.replaceChildren(el("p", { cls: "muted", text: t("q_empty") })); return; }
    const table = el("table", { cls: "quarantine" }, el("tr", {},
      ...["q_id", "q_received", "q_where", "q_size", "q_reason", "q_state", ""].map((k) => el("th", { text: k ? t(k) : "" }))));
    for (const item of q.items) {
      const show = el("button", { type: "button", cls: "show", text: t("q_show") });
      show.addEventListener("click", () => showItem(item.id).catch((e) => {
        document.getElementById("tg-q-result").textContent = t("error", { reason: e.message });
      }));
      const replay = el("button", { type: "button", cls: "replay", text: t("q_replay") });
      replay.addEventListener("click", () => askReplay(item));
      const state = item.state === "held" ? t("q_held") : `${t("q_replayed")}: ${item.replay_result || ""}`;
      table.append(el("tr", { "data-id": item.id, "data-state": item.state },
        el("td", { cls: "mono", text: item.id }),
        el("td", { title: item.received_at, text: stamp.format(new Date(item.received_at)) }),
        el("td", { text: `${item.channel}/${item.inbox}` }),
        el("td", { text: bytes(item.size) }),
        el("td", { cls: "reason", text: item.reason }),
        el("td", { cls: item.state === "held" ? "warn" : "ok", text: state }),
        el("td", {}, show, " ", replay)));
    }
    box.replaceChildren(table);
  }

  function render(d) {
    current = d;
    overview(d);
    channels(d);
    quarantine(d);
    const updated = document.getElementById("tg-updated");
    updated.textContent = `${t("updated")} ${stamp.format(new Date(d.generated_at))}`;
    updated.className = "muted";
    document.body.dataset.generatedAt = d.generated_at;
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      render(await api("/status/api/summary"));
    } catch (error) {
      const updated = document.getElementById("tg-updated");
      updated.textContent = t("stale", { reason: error.message });
      updated.className = "bad";
    }
    timer = setTimeout(refresh, (current.refresh_interval || 5) * 1000);
  }

  render(current);
  timer = setTimeout(refresh, (current.refresh_interval || 5) * 1000);
})();
