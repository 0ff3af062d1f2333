/* ticketgate live chat widget. No build step, no dependencies: embed it with
     <script src="https://gateway.example/chat/INBOX/widget.js" async></script>
   Optional attributes on that tag: data-lang="zh|en"; for a signed-in user, computed by the site's
   backend: data-user-id, data-user-email, data-user-hash (hex HMAC-SHA256, see
   docs/channels/webchat.md) and data-user-name. Script API: window.TicketgateChat.open(), .close(),
   .identify({userId, email, hash, name}), .reset() (on sign-out).
   Protocol: one WebSocket; "hello" -> "welcome" (session token, held replies); every message has a
   client id and stays queued (in localStorage) until the gateway's "ack" says it is stored. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !script.src || window.TicketgateChat) { return; }
  var base = script.src.replace(/\/widget\.js(?:[?#].*)?$/, "");
  var wsBase = base.replace(/^http/, "ws");
  var inbox = decodeURIComponent(base.split("/").pop());

  var STRINGS = {
    en: {
      open: "Chat with us", close: "Close chat", title: "Chat with us", input: "Type your message",
      send: "Send", attach: "Attach a file", connecting: "Connecting…", online: "Connected",
      offline: "Offline: your messages will be sent when the connection is back.",
      pending: "Sending", delivered: "Delivered", failed: "Not sent", retry: "Send again",
      read: "Read", you: "You", agent: "Support", typing: "Support is typing…", unread: "unread",
      too_big: "This file is too large.", bad_type: "This type of file cannot be sent.",
      too_long: "This message is too long.", new_reply: "New reply from support"
    },
    zh: {
      open: "在线咨询", close: "关闭对话", title: "在线客服", input: "输入消息",
      send: "发送", attach: "添加附件", connecting: "正在连接…", online: "已连接",
      offline: "网络已断开：恢复连接后会自动发送您的消息。",
      pending: "发送中", delivered: "已送达", failed: "未发送", retry: "重新发送",
      read: "已读", you: "我", agent: "客服", typing: "客服正在输入…", unread: "条未读",
      too_big: "文件过大。", bad_type: "不支持发送此类型的文件。",
      too_long: "消息过长。", new_reply: "客服有新回复"
    }
  };

  function pickLanguage() {
    var forced = script.getAttribute("data-lang");
    if (forced === "zh" || forced === "en") { return forced; }
    var list = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
    for (var i = 0; i < list.length; i++) {
      var primary = String(list[i]).toLowerCase().split("-")[0];
      if (primary === "zh" || primary === "en") { return primary; }
    }
    return "en";
  }
  var lang = pickLanguage();
  var T = STRINGS[lang];

  // -- storage (localStorage where the page or WebView allows it, else memory) --------------------
  var storeKey = "ticketgate-chat:" + base;
  var memory = {};
  function load() {
    try {
      var raw = window.localStorage.getItem(storeKey);
      return raw ? JSON.parse(raw) : {};
    } catch (e) { return memory; }
  }
  var state = load();
  state.messages = state.messages || [];   // the transcript: {kind, id, text, at, status, name}
  state.queue = state.queue || [];         // client ids of own messages not yet acknowledged
  function save() {
    // Another tab of the same site may have queued messages meanwhile: keep theirs too. Two tabs
    // sending one queued message is harmless (same client id: the gateway stores it once).
    var stored = load();
    if (stored && stored.messages && (stored.user || null) === (state.user || null) && stored !== state) {
      var known = {};
      for (var i = 0; i < state.messages.length; i++) { known[state.messages[i].id] = true; }
      for (var j = 0; j < stored.messages.length; j++) {
        var other = stored.messages[j];
        if (!known[other.id]) {
          state.messages.push(other);
          if (log) { render(other); }
          if ((stored.queue || []).indexOf(other.id) >= 0 && state.queue.indexOf(other.id) < 0) { state.queue.push(other.id); }
        }
      }
    }
    if (state.messages.length > 200) { state.messages = state.messages.slice(-200); }
    try { window.localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) { memory = state; }
  }

  var identity = null;
  function identityFromScript() {
    var id = script.getAttribute("data-user-id");
    if (!id) { return null; }
    return {
      user_id: id, email: script.getAttribute("data-user-email") || null,
      signature: script.getAttribute("data-user-hash") || "", name: script.getAttribute("data-user-name") || null
    };
  }
  identity = identityFromScript();
  if ((identity ? identity.user_id : null) !== (state.user || null)) {
    // Someone else (or nobody) is signed in on this browser now: never show the last person's chat.
    state = { messages: [], queue: [], user: identity ? identity.user_id : null };
    save();
  }

  function newId() {
    if (window.crypto && window.crypto.randomUUID) { return window.crypto.randomUUID(); }
    var bytes = new Uint8Array(16);
    (window.crypto || window.msCrypto).getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  // -- the UI, in a shadow root so the host page's CSS cannot reach it ------------------------------
  var CSS = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'PingFang SC','Microsoft YaHei',sans-serif}",
    ".launcher{position:fixed;right:20px;bottom:20px;z-index:2147483000;border:0;border-radius:28px;",
    "padding:0 20px 0 16px;height:56px;display:flex;align-items:center;gap:8px;background:#1d4ed8;color:#fff;",
    "font-size:16px;font-weight:600;cursor:pointer;box-shadow:0 6px 20px rgba(15,23,42,.25)}",
    ".launcher:focus-visible,button:focus-visible,textarea:focus-visible,label.attach:focus-within",
    "{outline:3px solid #f59e0b;outline-offset:2px}",
    ".badge[hidden]{display:none}",
    "svg{width:22px;height:22px;fill:none;stroke:currentColor;stroke-width:2;stroke-linecap:round;stroke-linejoin:round}",
    ".badge{min-width:22px;height:22px;border-radius:11px;background:#dc2626;color:#fff;font-size:13px;",
    "display:inline-flex;align-items:center;justify-content:center;padding:0 6px}",
    ".panel{position:fixed;right:20px;bottom:88px;z-index:2147483000;width:360px;max-width:calc(100vw - 24px);",
    "height:520px;max-height:calc(100vh - 110px);background:#fff;border-radius:14px;display:flex;",
    "flex-direction:column;box-shadow:0 12px 40px rgba(15,23,42,.3);overflow:hidden;color:#111827}",
    ".panel[hidden]{display:none}",
    "header{background:#1d4ed8;color:#fff;padding:14px 16px;display:flex;align-items:center;gap:8px}",
    "header h2{margin:0;font-size:17px;flex:1}",
    "header button{background:transparent;border:0;color:#fff;font-size:22px;line-height:1;cursor:pointer;",
    "width:32px;height:32px;border-radius:6px}",
    ".status{font-size:12px;padding:6px 16px;background:#fef3c7;color:#78350f}",
    ".status.ok{background:#ecfdf5;color:#065f46}",
    ".log{flex:1;overflow-y:auto;padding:14px 12px;background:#f8fafc;display:flex;flex-direction:column;gap:8px}",
    ".greeting,.msg{max-width:82%;padding:8px 12px;border-radius:14px;font-size:14px;line-height:1.45;",
    "white-space:pre-wrap;word-wrap:break-word}",
    ".greeting,.msg.agent{align-self:flex-start;background:#fff;border:1px solid #e2e8f0}",
    ".msg.own{align-self:flex-end;background:#1d4ed8;color:#fff}",
    ".msg.own.failed{background:#fee2e2;color:#7f1d1d}",
    ".meta{display:block;font-size:11px;opacity:.8;margin-top:3px;text-align:right}",
    ".msg.agent .meta{text-align:left}",
    ".tick{margin-left:4px;font-weight:700}",
    "svg.clip{width:14px;height:14px;vertical-align:-2px}",
    "button.file{display:flex;align-items:center;gap:4px;margin-top:6px;border:1px solid #cbd5e1;",
    "background:#f1f5f9;color:#1e3a8a;border-radius:8px;padding:4px 8px;font-size:13px;cursor:pointer}",
    "button.file svg{width:14px;height:14px}",
    ".msg button.again{margin-left:6px;font-size:11px;border:1px solid currentColor;background:transparent;",
    "color:inherit;border-radius:4px;cursor:pointer}",
    ".typing{font-size:12px;color:#475569;padding:0 16px 4px;min-height:18px;background:#f8fafc}",
    "form{display:flex;gap:6px;padding:10px;border-top:1px solid #e2e8f0;align-items:flex-end;background:#fff}",
    "textarea{flex:1;resize:none;border:1px solid #cbd5e1;border-radius:10px;padding:8px 10px;font-size:14px;",
    "min-height:40px;max-height:120px;color:#111827}",
    ".send{background:#1d4ed8;color:#fff;border:0;border-radius:10px;height:40px;padding:0 14px;font-size:14px;",
    "font-weight:600;cursor:pointer}",
    "label.attach{display:inline-flex;align-items:center;justify-content:center;width:40px;height:40px;",
    "border:1px solid #cbd5e1;border-radius:10px;cursor:pointer;font-size:18px;color:#334155}",
    "label.attach input{position:absolute;width:1px;height:1px;opacity:0}",
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}",
    "@media (max-width:480px){.panel{right:0;bottom:0;width:100vw;max-width:100vw;height:100%;",
    "max-height:100%;border-radius:0}}"
  ].join("");

  var host = document.createElement("div");
  host.id = "ticketgate-chat";
  var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
  if (root.adoptedStyleSheets !== undefined && window.CSSStyleSheet) {
    // A constructed sheet: no inline <style>, so a host page's strict style-src CSP still allows it.
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    root.adoptedStyleSheets = [sheet];
  } else {
    var style = document.createElement("style");
    style.textContent = CSS;
    root.appendChild(style);
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var name in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, name)) { node.setAttribute(name, attrs[name]); } }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }

  function icon(path) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    var shape = document.createElementNS(ns, "path");
    shape.setAttribute("d", path);
    svg.appendChild(shape);
    return svg;
  }

  var launcher = el("button", { type: "button", "class": "launcher", id: "tg-chat-launcher",
    "aria-expanded": "false", "aria-controls": "tg-chat-panel" });
  var launcherIcon = icon("M21 12a8 8 0 0 1-11.6 7.1L4 20.5l1.4-4.9A8 8 0 1 1 21 12z");
  var launcherText = el("span", {}, T.open);
  var badge = el("span", { "class": "badge", hidden: "" });
  launcher.appendChild(launcherIcon); launcher.appendChild(launcherText); launcher.appendChild(badge);

  var panel = el("section", { "class": "panel", id: "tg-chat-panel", role: "dialog", "aria-modal": "false",
    "aria-labelledby": "tg-chat-title", hidden: "" });
  var header = el("header");
  var title = el("h2", { id: "tg-chat-title" }, T.title);
  var closeButton = el("button", { type: "button", id: "tg-chat-close", "aria-label": T.close }, "×");
  header.appendChild(title); header.appendChild(closeButton);
  var status = el("div", { "class": "status", id: "tg-chat-status", role: "status" }, T.connecting);
  // role=log is a polite live region: screen readers announce each new message as it is added.
  var log = el("div", { "class": "log", id: "tg-chat-log", role: "log", "aria-live": "polite",
    "aria-relevant": "additions", tabindex: "0", "aria-label": T.title });
  var greeting = el("div", { "class": "greeting", id: "tg-chat-greeting" });
  log.appendChild(greeting);
  var typing = el("div", { "class": "typing", id: "tg-chat-typing", "aria-live": "polite" });
  var form = el("form", { id: "tg-chat-form" });
  var inputLabel = el("label", { "for": "tg-chat-input", "class": "sr" }, T.input);
  var input = el("textarea", { id: "tg-chat-input", rows: "1", placeholder: T.input, maxlength: "5000" });
  var attach = el("label", { "class": "attach", title: T.attach });
  var attachText = el("span", { "class": "sr" }, T.attach);
  var fileInput = el("input", { type: "file", id: "tg-chat-file" });
  attach.appendChild(icon("M21 11.5l-8.6 8.6a5 5 0 0 1-7.1-7.1l8.6-8.6a3.3 3.3 0 0 1 4.7 4.7l-8.6 8.6a1.7 1.7 0 0 1-2.4-2.4l7.9-7.9"));
  attach.appendChild(attachText);
  attach.appendChild(fileInput);
  var sendButton = el("button", { type: "submit", "class": "send", id: "tg-chat-send" }, T.send);
  form.appendChild(inputLabel); form.appendChild(attach); form.appendChild(input); form.appendChild(sendButton);
  panel.appendChild(header); panel.appendChild(status); panel.appendChild(log); panel.appendChild(typing);
  panel.appendChild(form);
  // Announces a reply while the panel is closed (the log's live region is inside the hidden panel).
  var notice = el("div", { "class": "sr", role: "status", "aria-live": "polite", id: "tg-chat-notice" });
  root.appendChild(launcher); root.appendChild(panel); root.appendChild(notice);

  // -- rendering ---------------------------------------------------------------------------------
  function clock(iso) {
    var d = iso ? new Date(iso) : new Date();
    if (isNaN(d.getTime())) { return ""; }
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }
  function findMessage(id) {
    for (var i = 0; i < state.messages.length; i++) { if (state.messages[i].id === id) { return state.messages[i]; } }
    return null;
  }
  function nodeFor(m) {
    var selector = m.kind === "own" ? '[data-client-id="' + m.id + '"]' : '[data-reply-id="' + m.id + '"]';
    return log.querySelector(selector);
  }
  function render(m) {
    var node = nodeFor(m);
    var fresh = !node;
    if (fresh) {
      node = el("div", {});
      node.setAttribute(m.kind === "own" ? "data-client-id" : "data-reply-id", m.id);
    }
    node.className = "msg " + m.kind + (m.status === "failed" ? " failed" : "");
    node.setAttribute("data-status", m.status || "");
    node.textContent = "";
    var who = el("span", { "class": "sr" }, (m.kind === "own" ? T.you : (m.name || T.agent)) + ": ");
    node.appendChild(who);
    node.appendChild(document.createTextNode(m.text || ""));
    if (m.files) {
      for (var f = 0; f < m.files.length; f++) { node.appendChild(fileLink(m.files[f])); }
    }
    if (m.file) {
      if (m.text) { node.appendChild(document.createTextNode("\n")); }
      var clip = icon("M21 11.5l-8.6 8.6a5 5 0 0 1-7.1-7.1l8.6-8.6a3.3 3.3 0 0 1 4.7 4.7l-8.6 8.6a1.7 1.7 0 0 1-2.4-2.4l7.9-7.9");
      clip.setAttribute("class", "clip");
      node.appendChild(clip);
      node.appendChild(document.createTextNode(" " + m.file));
    }
    var meta = el("span", { "class": "meta" }, (m.kind === "agent" ? (m.name || T.agent) + " · " : "") + clock(m.at));
    if (m.kind === "own") {
      var label = m.status === "read" ? T.read : m.status === "delivered" ? T.delivered : m.status === "failed" ? T.failed : T.pending;
      var tick = el("span", { "class": "tick", "aria-label": label, title: label },
        m.status === "read" ? "✓✓" : m.status === "delivered" ? "✓" : m.status === "failed" ? "!" : "…");
      meta.appendChild(tick);
      if (m.status === "failed" && !m.file) {
        var again = el("button", { type: "button", "class": "again" }, T.retry);
        again.addEventListener("click", function () { m.status = "pending"; state.queue.push(m.id); save(); render(m); pump(); });
        meta.appendChild(again);
      }
    }
    node.appendChild(meta);
    if (fresh) { log.appendChild(node); log.scrollTop = log.scrollHeight; }
  }
  // An agent's file: fetched with the session token (it is not a public URL), then saved.
  function fileLink(f) {
    var link = el("button", { type: "button", "class": "file" }, f.name);
    link.insertBefore(icon("M21 11.5l-8.6 8.6a5 5 0 0 1-7.1-7.1l8.6-8.6a3.3 3.3 0 0 1 4.7 4.7l-8.6 8.6a1.7 1.7 0 0 1-2.4-2.4l7.9-7.9"), link.firstChild);
    link.addEventListener("click", function () {
      fetch(base + "/files/" + f.sha256, { headers: { Authorization: "Bearer " + state.token } })
        .then(function (response) { if (!response.ok) { throw new Error(String(response.status)); } return response.blob(); })
        .then(function (blob) {
          var a = document.createElement("a");
          a.href = URL.createObjectURL(blob); a.download = f.name;
          document.body.appendChild(a); a.click(); a.remove();
          setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
        })
        .catch(function () { setStatusNote(T.failed); });
    });
    return link;
  }
  function renderAll() {
    for (var i = 0; i < state.messages.length; i++) { render(state.messages[i]); }
    updateBadge();
  }
  function unreadIds() {
    var ids = [];
    for (var i = 0; i < state.messages.length; i++) {
      var m = state.messages[i];
      if (m.kind === "agent" && m.status !== "read") { ids.push(m.id); }
    }
    return ids;
  }
  function updateBadge() {
    var n = isOpen() ? 0 : unreadIds().length;
    if (n > 0) { badge.textContent = String(n); badge.removeAttribute("hidden"); launcher.setAttribute("aria-label", T.open + " (" + n + " " + T.unread + ")"); }
    else { badge.setAttribute("hidden", ""); launcher.removeAttribute("aria-label"); }
  }
  function setStatus(kind) {
    status.textContent = kind === "online" ? T.online : kind === "offline" ? T.offline : T.connecting;
    status.className = "status" + (kind === "online" ? " ok" : "");
    status.setAttribute("data-state", kind);
  }

  // -- opening and closing (keyboard: Escape closes and gives focus back to the launcher) ----------
  function isOpen() { return !panel.hasAttribute("hidden"); }
  function open() {
    panel.removeAttribute("hidden");
    launcher.setAttribute("aria-expanded", "true");
    input.focus();
    connect();
    markRead();
    updateBadge();
  }
  function close() {
    panel.setAttribute("hidden", "");
    launcher.setAttribute("aria-expanded", "false");
    launcher.focus();
    updateBadge();
  }
  launcher.addEventListener("click", function () { if (isOpen()) { close(); } else { open(); } });
  closeButton.addEventListener("click", close);
  panel.addEventListener("keydown", function (e) { if (e.key === "Escape") { e.preventDefault(); close(); } });

  // -- the socket --------------------------------------------------------------------------------
  var ws = null;
  var ready = false;          // welcomed: frames may be sent
  var inFlight = null;        // the client id sent and not yet answered (one at a time keeps order)
  var inFlightTimer = null;
  var retryTimer = null;
  var backoff = 1000;
  var idleClosed = false;     // the gateway closed an idle socket: reconnect on the visitor's next move
  var pingTimer = null;
  var pongTimer = null;
  var limits = { text_chars: 5000, upload_bytes: 10485760, upload_types: [] };
  var files = {};             // client id -> File, for uploads still to go (not kept across reloads)

  function connect() {
    if (ws) { return; }
    if (navigator.onLine === false) { setStatus("offline"); return; }
    idleClosed = false;
    clearTimeout(retryTimer);
    setStatus("connecting");
    try { ws = new WebSocket(wsBase + "/ws"); } catch (e) { scheduleReconnect(); return; }
    var socket = ws;
    socket.onopen = function () {
      var hello = { type: "hello", token: state.token || null, lang: lang, page: String(location.origin + location.pathname).slice(0, 2000) };
      if (identity) { hello.identity = identity; if (identity.name) { hello.name = identity.name; } }
      socket.send(JSON.stringify(hello));
    };
    socket.onmessage = function (event) {
      if (socket !== ws) { return; }
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (typeof event.data !== "string") { return; }
      onFrame(frame);
    };
    socket.onclose = function (event) {
      if (socket !== ws) { return; }
      dropSocket();
      if (event.code === 4408) { idleClosed = true; setStatus("connecting"); return; }
      scheduleReconnect();
    };
    socket.onerror = function () { /* onclose follows */ };
  }
  function dropSocket() {
    var socket = ws;
    ws = null; ready = false;
    clearTimeout(inFlightTimer); clearInterval(pingTimer); clearTimeout(pongTimer);
    if (inFlight) { inFlight = null; }  // unanswered: sent again (same client id) after reconnecting
    if (socket) { try { socket.close(); } catch (e) { /* already closed */ } }
  }
  function scheduleReconnect() {
    setStatus(navigator.onLine === false ? "offline" : "connecting");
    clearTimeout(retryTimer);
    var delay = Math.min(backoff, 30000) * (0.5 + Math.random() / 2);
    backoff = Math.min(backoff * 2, 30000);
    retryTimer = setTimeout(connect, delay);
  }
  function wake() { if (!ws && (idleClosed || navigator.onLine !== false)) { backoff = 1000; connect(); } }
  window.addEventListener("online", wake);
  window.addEventListener("offline", function () { dropSocket(); setStatus("offline"); });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) { wake(); markRead(); } });

  function startPings() {
    // The gateway pings too; this notices a dead network from our side within ~30 s.
    clearInterval(pingTimer);
    pingTimer = setInterval(function () {
      // A hidden tab stays quiet, so the gateway's idle timeout closes abandoned tabs' sockets; the
      // widget reconnects (and gets what was held) when the tab is shown again.
      if (!ws || !ready || document.hidden) { return; }
      ws.send('{"type":"ping"}');
      clearTimeout(pongTimer);
      pongTimer = setTimeout(function () { dropSocket(); scheduleReconnect(); }, 10000);
    }, 20000);
  }

  function onFrame(frame) {
    if (frame.type === "welcome") {
      state.token = frame.token; state.session = frame.session; save();
      ready = true; backoff = 1000;
      if (frame.limits) { limits = frame.limits; input.setAttribute("maxlength", String(limits.text_chars)); }
      if (frame.title) { title.textContent = frame.title; log.setAttribute("aria-label", frame.title); }
      greeting.textContent = frame.greeting || "";
      setStatus("online");
      addReplies(frame.replies || []);
      startPings();
      pump();
    } else if (frame.type === "ack" || frame.type === "echo") {
      var m = findMessage(frame.client_id);
      if (!m && frame.type === "echo") {
        m = { kind: "own", id: frame.client_id, text: frame.text || "", at: new Date().toISOString() };
        state.messages.push(m);
      }
      if (m) { if (m.status !== "read") { m.status = "delivered"; } m.message_id = frame.message_id; render(m); }
      removeFromQueue(frame.client_id);
      save();
      if (frame.type === "ack" && frame.client_id === inFlight) { settle(); }
    } else if (frame.type === "error") {
      onError(frame);
    } else if (frame.type === "reply") {
      addReplies([frame]);
    } else if (frame.type === "read") {
      var ids = frame.ids || [];
      for (var i = 0; i < ids.length; i++) { var r = findMessage(ids[i]); if (r) { r.status = "read"; } }
      save(); updateBadge();
    } else if (frame.type === "seen") {
      // An agent read these of the visitor's messages (by the gateway's message id).
      var seen = frame.message_ids || [];
      for (var k = 0; k < state.messages.length; k++) {
        var own = state.messages[k];
        if (own.kind === "own" && own.message_id && seen.indexOf(own.message_id) >= 0) { own.status = "read"; render(own); }
      }
      save();
    } else if (frame.type === "typing") {
      typing.textContent = frame.agent ? frame.agent + " …" : T.typing;
      clearTimeout(typing._timer);
      typing._timer = setTimeout(function () { typing.textContent = ""; }, 6000);
    } else if (frame.type === "pong") {
      clearTimeout(pongTimer);
    }
  }
  function onError(frame) {
    var m = frame.client_id ? findMessage(frame.client_id) : null;
    if (!m) { return; }
    if (frame.code === "retry" || frame.code === "rate_limited") {
      // Not stored: it stays queued and goes again, unchanged, after the wait the gateway asked for.
      var wait = Math.max(1, frame.retry_after || 5) * 1000;
      clearTimeout(inFlightTimer);
      inFlightTimer = setTimeout(function () { inFlight = null; pump(); }, wait);
      return;
    }
    m.status = "failed"; m.error = frame.code;
    removeFromQueue(m.id); save(); render(m);
    if (frame.client_id === inFlight) { settle(); }
  }
  function settle() { clearTimeout(inFlightTimer); inFlight = null; pump(); }
  function removeFromQueue(id) {
    var i = state.queue.indexOf(id);
    if (i >= 0) { state.queue.splice(i, 1); }
  }

  function addReplies(replies) {
    var fresh = [];
    for (var i = 0; i < replies.length; i++) {
      var r = replies[i];
      var known = findMessage(r.id);
      if (known) { if (r.status === "read" && known.status !== "read") { known.status = "read"; } continue; }
      var m = { kind: "agent", id: r.id, text: r.text || "", at: r.at, name: r.agent || null,
        status: r.status === "read" ? "read" : "delivered" };
      if (r.files && r.files.length) { m.files = r.files; }
      state.messages.push(m);
      render(m);
      if (r.status === "sent") { fresh.push(r.id); }
    }
    save();
    if (fresh.length && ws && ready) { ws.send(JSON.stringify({ type: "received", ids: fresh })); }
    if (fresh.length) {
      typing.textContent = "";
      if (!isOpen()) { notice.textContent = ""; notice.textContent = T.new_reply; }
    }
    markRead();
    updateBadge();
  }
  function markRead() {
    if (!isOpen() || document.hidden || !ws || !ready) { return; }
    var ids = unreadIds();
    if (!ids.length) { return; }
    for (var i = 0; i < state.messages.length; i++) { if (ids.indexOf(state.messages[i].id) >= 0) { state.messages[i].status = "read"; } }
    save();
    ws.send(JSON.stringify({ type: "read", ids: ids }));
  }

  // Sends the oldest queued message (one at a time: the gateway stores them in this order).
  function pump() {
    if (!ws || !ready || inFlight || !state.queue.length) { return; }
    var id = state.queue[0];
    var m = findMessage(id);
    if (!m) { state.queue.shift(); save(); pump(); return; }
    inFlight = id;
    clearTimeout(inFlightTimer);
    // No answer in 15 s: the connection is presumed dead; reconnecting sends it again (same id).
    inFlightTimer = setTimeout(function () { if (inFlight === id) { dropSocket(); scheduleReconnect(); } }, m.file ? 120000 : 15000);
    if (m.files) {
      for (var f = 0; f < m.files.length; f++) { node.appendChild(fileLink(m.files[f])); }
    }
    if (m.file) { upload(m); return; }
    ws.send(JSON.stringify({ type: "message", client_id: id, text: m.text, sent_at: m.at }));
  }
  function upload(m) {
    var file = files[m.id];
    if (!file) { m.status = "failed"; removeFromQueue(m.id); save(); render(m); settle(); return; }
    var body = new FormData();
    body.append("client_id", m.id);
    body.append("sent_at", m.at);
    body.append("file", file, file.name);
    fetch(base + "/messages", { method: "POST", body: body, headers: { Authorization: "Bearer " + state.token } })
      .then(function (response) {
        return response.json().then(function (answer) {
          if (response.ok) { delete files[m.id]; onFrame(answer); return; }
          if (response.status === 503 || response.status === 429) {
            onError({ client_id: m.id, code: "retry", retry_after: Number(response.headers.get("Retry-After")) || 5 });
            return;
          }
          onError({ client_id: m.id, code: answer.code || answer.error || "rejected" });
        });
      })
      .catch(function () { if (inFlight === m.id) { inFlight = null; clearTimeout(inFlightTimer); scheduleRetryUpload(); } });
  }
  function scheduleRetryUpload() { clearTimeout(inFlightTimer); inFlightTimer = setTimeout(pump, 3000); }

  function queueMessage(text, file) {
    var m = { kind: "own", id: newId(), text: text, at: new Date().toISOString(), status: "pending" };
    if (file) { m.file = file.name; files[m.id] = file; }
    state.messages.push(m);
    state.queue.push(m.id);
    save();
    render(m);
    if (!ws) { wake(); }
    pump();
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text) { return; }
    if (text.length > limits.text_chars) { setStatusNote(T.too_long); return; }
    input.value = "";
    queueMessage(text, null);
    input.focus();
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit ? form.requestSubmit() : form.dispatchEvent(new Event("submit")); }
  });
  var lastTyping = 0;
  input.addEventListener("input", function () {
    var now = Date.now();
    if (ws && ready && now - lastTyping > 3000) { lastTyping = now; ws.send('{"type":"typing"}'); }
    if (!ws) { wake(); }
  });
  fileInput.addEventListener("change", function () {
    var file = fileInput.files && fileInput.files[0];
    fileInput.value = "";
    if (!file) { return; }
    if (file.size > limits.upload_bytes) { setStatusNote(T.too_big); return; }
    if (!typeAllowed(file.type)) { setStatusNote(T.bad_type); return; }
    queueMessage("", file);
  });
  function typeAllowed(type) {
    var list = limits.upload_types || [];
    if (!list.length) { return true; }
    var kind = String(type || "application/octet-stream").toLowerCase();
    return list.indexOf(kind) >= 0 || list.indexOf(kind.split("/")[0] + "/*") >= 0;
  }
  function setStatusNote(text) { status.textContent = text; status.className = "status"; }

  // Messages queued in an earlier page (typed offline, or unanswered) go first; files cannot be kept.
  for (var q = 0; q < state.messages.length; q++) {
    var queued = state.messages[q];
    if (queued.kind === "own" && queued.status === "pending" && queued.file) { queued.status = "failed"; removeFromQueue(queued.id); }
  }
  function mount() {
    document.body.appendChild(host);
    renderAll();
    if (state.queue.length || state.token) { connect(); }  // resume: held replies, queued messages
  }
  if (document.body) { mount(); } else { document.addEventListener("DOMContentLoaded", mount); }

  window.TicketgateChat = {
    open: open,
    close: close,
    identify: function (who) {
      identity = who && who.userId ? { user_id: String(who.userId), email: who.email || null, signature: who.hash || "", name: who.name || null } : null;
      if ((identity ? identity.user_id : null) !== (state.user || null)) {
        state = { messages: [], queue: [], user: identity ? identity.user_id : null }; save();
        log.textContent = ""; log.appendChild(greeting);
      }
      dropSocket(); connect();
    },
    reset: function () {
      identity = null; state = { messages: [], queue: [], user: null };
      try { window.localStorage.removeItem(storeKey); } catch (e) { memory = {}; }
      save(); dropSocket(); log.textContent = ""; log.appendChild(greeting); },
    inbox: inbox
  };
})();
