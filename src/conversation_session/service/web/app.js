// The conversation-session web page: the service's own REST API, nothing else.
// Every piece of session content reaches the page through textContent (never innerHTML),
// and the server's Content-Security-Policy forbids inline scripts: a message holding HTML
// shows as the text it is.
"use strict";

const TOKEN_KEY = "conversation-session.token";

const state = {
  token: localStorage.getItem(TOKEN_KEY) || "",
  sid: null,            // the open session
  session: null,        // its last GET /v1/sessions/{sid}
  streaming: null,      // {sid, controller} while a reply is being followed
  searchTimer: null,
};

function $(id) { return document.getElementById(id); }

function el(tag, props, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children || []) node.append(child);
  return node;
}

// -- talking to the service -----------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body, signal) {
  const headers = {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    askToken(state.token ? "That token was not accepted: check it and enter it again."
                         : "This service needs an access token.");
    throw new ApiError(401, "unauthorized", "an access token is needed");
  }
  if (!resp.ok) {
    let code = "http_" + resp.status, message = resp.statusText || "request failed";
    try {
      const data = await resp.json();
      if (data && data.error) { code = data.error.code; message = data.error.message; }
    } catch (e) { /* not JSON: keep the status text */ }
    throw new ApiError(resp.status, code, message);
  }
  return resp;
}

async function apiJson(method, path, body) {
  return (await api(method, path, body)).json();
}

// Server-sent events from a fetch() body (EventSource cannot send an Authorization header).
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(event, JSON.parse(data));
    }
  }
}

function sessionPath(sid, rest) { return "/v1/sessions/" + encodeURIComponent(sid) + (rest || ""); }

// -- status line ----------------------------------------------------------------------------------
function say(message, ok) {
  const status = $("status");
  status.textContent = message || "";
  status.className = ok ? "ok" : "";
}

function fail(error) {
  if (error && error.name === "AbortError") return;
  if (error instanceof ApiError && error.status === 401) return;  // the token form says it
  say(error instanceof ApiError ? error.message : "The service cannot be reached (" + error + ").");
}

// -- tokens ---------------------------------------------------------------------------------------
function askToken(message) {
  $("token-message").textContent = message || "";
  $("token-input").value = "";
  $("token-panel").hidden = false;
  $("token-input").focus();
}

function saveToken(event) {
  event.preventDefault();
  state.token = $("token-input").value.trim();
  if (state.token) localStorage.setItem(TOKEN_KEY, state.token);
  else localStorage.removeItem(TOKEN_KEY);
  $("token-panel").hidden = true;
  say("");
  start();
}

// -- safe Markdown ---------------------------------------------------------------------------------
// A small subset (paragraphs, headings, lists, quotes, fenced code, `code`, **strong**, *em*,
// http(s) links), built as DOM nodes whose text is set with textContent.
const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;

function renderMarkdown(text, into) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const closing = m[1][0].repeat(m[1].length);
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(closing)) body.push(lines[i++]);
      i++;
      const code = el("code", { text: body.join("\n") });
      if (m[2]) code.dataset.lang = m[2];
      into.append(el("pre", {}, [code]));
    } else if ((m = HEADING.exec(line))) {
      const h = el("h" + Math.min(m[1].length + 2, 6));
      inline(m[2], h);
      into.append(h);
      i++;
    } else if (ITEM.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? "ol" : "ul");
      while (i < lines.length && (m = ITEM.exec(lines[i])) && /^\s*\d/.test(lines[i]) === ordered) {
        const li = el("li");
        inline(m[2], li);
        list.append(li);
        i++;
      }
      into.append(list);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { quoted.push(m[1]); i++; }
      const block = el("blockquote");
      renderMarkdown(quoted.join("\n"), block);
      into.append(block);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
             && !(para.length && (ITEM.test(lines[i]) || QUOTE.test(lines[i])))) {
        para.push(lines[i++]);
      }
      const p = el("p");
      para.forEach((part, k) => { if (k) p.append(el("br")); inline(part, p); });
      into.append(p);
    }
  }
}

const INLINE = /(`+)([^`]+?)\1|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;

function inline(text, into) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) into.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[2] !== undefined) into.append(el("code", { text: m[2] }));
    else if (m[3] !== undefined || m[4] !== undefined) into.append(el("strong", { text: m[3] || m[4] }));
    else if (m[5] !== undefined) into.append(el("em", { text: m[5] }));
    else into.append(linkOrText(m[6], m[7], m[0]));
  }
  if (last < text.length) into.append(document.createTextNode(text.slice(last)));
}

function linkOrText(label, href, raw) {
  let url = null;
  try { url = new URL(href); } catch (e) { url = null; }
  if (!url || (url.protocol !== "https:" && url.protocol !== "http:")) return document.createTextNode(raw);
  return el("a", { text: label, href: url.href, rel: "noopener noreferrer nofollow", target: "_blank" });
}

// -- the conversation -------------------------------------------------------------------------------
function messageNode(role, content, interrupted, message) {
  const labels = { user: "You", assistant: "Reply", system: "System prompt", tool: "Tool result" };
  const who = el("div", { class: "who" }, [el("span", { text: labels[role] || role })]);
  const body = el("div", { class: "body" });
  const node = el("article", { class: "msg " + role, "aria-label": labels[role] || role }, [who, body]);
  if (role === "tool") {  // a tool's result, as text: "name → result"
    body.textContent = ((message && message.name) ? message.name + " → " : "") + (content || "");
    node.dataset.raw = content || "";
  } else {
    fillBody(node, role, content || "");
  }
  const calls = (message && Array.isArray(message.tool_calls)) ? message.tool_calls : [];
  if (calls.length) node.append(callsNode(calls));
  if (interrupted) markInterrupted(node);
  return node;
}

// The calls an assistant message asked for, one line each, as text: 🔧 name({"arg": ...}).
function callsNode(calls) {
  const list = el("ul", { class: "calls", "aria-label": "tool calls" });
  for (const c of calls) {
    const fn = (c && c.function) || {};
    let args = fn.arguments;
    if (typeof args !== "string") { try { args = JSON.stringify(args || {}); } catch (e) { args = "{}"; } }
    list.append(el("li", { text: "🔧 " + String(fn.name || "?") + "(" + args + ")" }));
  }
  return list;
}

// A call of a reply still being written, as it happens: its line when it starts, its result
// (or error) added to that line once saved; as text, like the saved history's calls.
function showToolEvent(bubble, event, data) {
  let list = bubble.querySelector("ul.calls");
  if (!list) { list = el("ul", { class: "calls", "aria-label": "tool calls" }); bubble.append(list); }
  const id = String(data.id || "");
  let line = Array.from(list.children).find((li) => li.dataset.id === id);
  if (!line) {
    let args = data.arguments;
    if (typeof args !== "string") { try { args = JSON.stringify(args || {}); } catch (e) { args = "{}"; } }
    line = el("li", { text: "🔧 " + String(data.name || "?") + "(" + args + ")" });
    line.dataset.id = id;
    list.append(line);
  }
  if (event === "tool_result") {
    const outcome = data.error !== undefined ? data.error : data.result;
    line.append(document.createTextNode(" → " + String(outcome === undefined ? "" : outcome)));
  }
}

function fillBody(node, role, content) {
  const body = node.querySelector(".body");
  body.replaceChildren();
  if (role === "assistant") renderMarkdown(content, body);
  else body.textContent = content;
  node.dataset.raw = content;
}

function markInterrupted(node) {
  if (node.querySelector(".badge")) return;
  node.classList.add("interrupted");
  node.querySelector(".who").append(el("span", { class: "badge", text: "interrupted",
    title: "stopped before the end: kept as far as it was written" }));
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function titleOf(s) {
  return s.title || s.first_user_line || firstUserLine(s.history) || "New session";
}

function firstUserLine(history) {
  const first = (history || []).find((m) => m.role === "user");
  return first ? first.content.split("\n")[0].slice(0, 80) : "";
}

function renderSession() {
  const s = state.session;
  const box = $("messages");
  box.replaceChildren();
  $("conversation-head").hidden = !s;
  $("empty-hint").hidden = !!(s && s.history && s.history.length);
  if (!s) return;
  $("session-title").textContent = titleOf(s);
  for (const m of s.history) box.append(messageNode(m.role, m.content, m.interrupted, m));
  if ($("stats").open) loadStats();
  updateButtons();
  scrollDown();
}

function updateButtons() {
  const busy = !!state.streaming;
  const turns = state.session ? state.session.turns : 0;
  $("stop").disabled = !busy && !speaking();
  $("undo").disabled = busy || !turns;
  $("retry").disabled = busy || !turns;
  $("send").disabled = busy;
  for (const id of ["rename", "delete", "export-json", "export-md"]) $(id).disabled = busy || !state.sid;
}

async function openSession(sid, { follow = true } = {}) {
  if (state.streaming && state.streaming.sid !== sid) state.streaming.controller.abort();
  if (voice.sid && voice.sid !== sid) closeVoice();
  state.sid = sid;
  if (location.hash !== "#" + sid) history.replaceState(null, "", "#" + sid);
  document.body.classList.remove("show-list");
  $("toggle-list").setAttribute("aria-expanded", "false");
  markCurrent();
  try {
    state.session = await apiJson("GET", sessionPath(sid));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      state.sid = null; state.session = null; history.replaceState(null, "", "#");
      renderSession();
      say("That session no longer exists.");
      return;
    }
    fail(error);
    return;
  }
  renderSession();
  if (follow && !state.streaming) followLive(sid);
}

// A reply still being written (sent from another tab, or before this page was reloaded).
async function followLive(sid) {
  const controller = new AbortController();
  try {
    const resp = await api("GET", sessionPath(sid, "/live"), undefined, controller.signal);
    let bubble = null;
    let idleTurns = null;
    await stream(resp, controller, sid, (event, data) => {
      if (event === "idle") { idleTurns = data.turns; return null; }
      if (event === "start") {
        if (data.retry) dropLastReply();
        else $("messages").append(messageNode("user", data.text));
        bubble = startReply();
      }
      return bubble;
    });
    if (idleTurns !== null && state.session && idleTurns !== state.session.turns && state.sid === sid) {
      await openSession(sid, { follow: false });  // a reply was saved in the meantime
    }
  } catch (error) { fail(error); }
}

function startReply() {
  const node = messageNode("assistant", "");
  node.classList.add("streaming");
  $("messages").append(node);
  $("empty-hint").hidden = true;
  scrollDown();
  return node;
}

function dropLastReply() {
  const replies = $("messages").querySelectorAll(".msg.assistant");
  if (replies.length) replies[replies.length - 1].remove();
}

// Follow one reply's events into its bubble; afterwards the saved session is shown as it is.
async function stream(resp, controller, sid, onStart) {
  if (resp.headers.get("content-type").indexOf("text/event-stream") < 0) return;
  state.streaming = { sid, controller };
  updateButtons();
  let bubble = null, reply = "", drawn = false, ended = false;
  const redraw = () => {
    drawn = false;
    if (bubble) { fillBody(bubble, "assistant", reply); scrollDown(); }
  };
  try {
    await readEvents(resp, (event, data) => {
      if (event === "piece") {
        reply += data.text;
        if (!drawn) { drawn = true; requestAnimationFrame(redraw); }
      } else if (event === "tool_call" || event === "tool_result") {
        if (bubble) { showToolEvent(bubble, event, data); scrollDown(); }
      } else if (event === "done" || event === "interrupted") {
        ended = true;
      } else if (event === "error") {
        ended = true;
        say(data.message);
      } else {
        const node = onStart(event, data);
        if (node) bubble = node;
      }
    });
  } catch (error) {
    if (error.name !== "AbortError") say("The connection was lost; the reply goes on in the service. Reload to see it.");
  } finally {
    if (state.streaming && state.streaming.controller === controller) state.streaming = null;
    updateButtons();
  }
  if (ended && state.sid === sid) {
    await openSession(sid, { follow: false });
    refreshList();
  }
}

async function send(event) {
  if (event) event.preventDefault();
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.streaming) return;
  say("");
  try {
    if (!state.sid) await newSession({ quiet: true });
    const sid = state.sid;
    input.value = "";
    if (voiceOn()) { await sendVoice(sid, text); return; }
    const controller = new AbortController();
    const resp = await api("POST", sessionPath(sid, "/messages"),
                           { text, stream: true, detach: true }, controller.signal);
    await stream(resp, controller, sid, (ev, data) => {
      if (ev !== "start") return null;
      $("messages").append(messageNode("user", data.text));
      return startReply();
    });
  } catch (error) {
    if (!input.value) input.value = text;  // nothing was sent: keep what was typed
    fail(error);
  }
}

async function retry() {
  if (!state.sid || state.streaming) return;
  say("");
  const sid = state.sid;
  try {
    const controller = new AbortController();
    const resp = await api("POST", sessionPath(sid, "/retry"), { stream: true, detach: true }, controller.signal);
    await stream(resp, controller, sid, (ev) => {
      if (ev !== "start") return null;
      dropLastReply();
      return startReply();
    });
  } catch (error) { fail(error); }
}

async function stop() {
  if (bargeIn()) return;
  if (!state.streaming) return;
  try {
    await apiJson("POST", sessionPath(state.streaming.sid, "/stop"), {});
  } catch (error) { fail(error); }
}

async function undo() {
  if (!state.sid || state.streaming) return;
  try {
    const data = await apiJson("POST", sessionPath(state.sid, "/undo"), {});
    say(data.undone ? "The last turn was withdrawn." : "Nothing to undo.", true);
    await openSession(state.sid, { follow: false });
    refreshList();
  } catch (error) { fail(error); }
}

async function newSession({ quiet = false } = {}) {
  const data = await apiJson("POST", "/v1/sessions", {});
  state.sid = data.session_id;
  state.session = { session_id: data.session_id, history: [], turns: 0, title: null };
  history.replaceState(null, "", "#" + data.session_id);
  renderSession();
  await refreshList();
  if (!quiet) $("input").focus();
}

// -- the header's actions ------------------------------------------------------------------------------
function showRename() {
  if (!state.session) return;
  $("rename-input").value = state.session.title || "";
  $("rename-form").hidden = false;
  $("session-title").hidden = true;
  $("rename-input").focus();
}

function hideRename() {
  $("rename-form").hidden = true;
  $("session-title").hidden = false;
}

async function rename(event) {
  event.preventDefault();
  const title = $("rename-input").value;
  try {
    await apiJson("PATCH", sessionPath(state.sid), { title: title.trim() ? title : null });
    hideRename();
    await openSession(state.sid, { follow: false });
    refreshList();
    say("Renamed.", true);
  } catch (error) { fail(error); }
}

async function remove() {
  if (!state.sid) return;
  const name = titleOf(state.session || {});
  if (!window.confirm("Delete the session \u201c" + name + "\u201d and its whole history? This cannot be undone.")) return;
  try {
    await apiJson("DELETE", sessionPath(state.sid));
    state.sid = null;
    state.session = null;
    history.replaceState(null, "", "#");
    renderSession();
    await refreshList();
    say("Deleted.", true);
  } catch (error) { fail(error); }
}

async function exportAs(format) {
  if (!state.sid) return;
  try {
    const resp = await api("GET", sessionPath(state.sid, "/export?format=" + format));
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: state.sid + "." + format });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) { fail(error); }
}

async function loadStats() {
  if (!state.sid) return;
  const dl = $("stats-body");
  try {
    const data = await apiJson("GET", sessionPath(state.sid, "/stats"));
    dl.replaceChildren();
    for (const [key, value] of Object.entries(data.stats)) {
      if (value !== null && typeof value === "object") continue;
      dl.append(el("dt", { text: key.replace(/_/g, " ") }), el("dd", { text: String(value) }));
    }
  } catch (error) {
    dl.replaceChildren(el("dd", { text: error.message }));
  }
}

// -- the list and search ------------------------------------------------------------------------------
function when(iso) {
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

async function refreshList() {
  let data;
  try { data = await apiJson("GET", "/v1/sessions"); } catch (error) { fail(error); return; }
  const list = $("session-list");
  list.replaceChildren();
  for (const s of data.sessions) {
    const title = titleOf(s);
    const meta = s.turns + (s.turns === 1 ? " turn" : " turns") + " \u00b7 " + when(s.updated_at);
    const button = el("button", { type: "button", "aria-label": "Open session: " + title, "data-sid": s.session_id },
                      [el("span", { class: "item-title", text: title }), el("span", { class: "item-meta", text: meta })]);
    button.addEventListener("click", () => openSession(s.session_id));
    list.append(el("li", {}, [button]));
  }
  if (!data.sessions.length) list.append(el("li", { class: "hint", text: "No sessions yet." }));
  markCurrent();
}

function markCurrent() {
  for (const b of $("session-list").querySelectorAll("button[data-sid]")) {
    b.setAttribute("aria-current", b.dataset.sid === state.sid ? "true" : "false");
  }
}

function onSearchInput() {
  clearTimeout(state.searchTimer);
  state.searchTimer = setTimeout(runSearch, 250);
}

async function runSearch() {
  const q = $("search").value.trim();
  const results = $("search-results");
  $("session-list").hidden = !!q;
  results.hidden = !q;
  if (!q) return;
  let data;
  try { data = await apiJson("GET", "/v1/search?q=" + encodeURIComponent(q)); } catch (error) { fail(error); return; }
  if ($("search").value.trim() !== q) return;  // typed on meanwhile
  results.replaceChildren();
  for (const hit of data.hits) {
    const title = hit.title || hit.session_id;
    const button = el("button", { type: "button", "aria-label": "Open session " + title + ": " + hit.snippet,
                                  "data-sid": hit.session_id },
                      [el("span", { class: "item-title", text: title }),
                       el("span", { class: "item-meta", text: hit.role + ": " + hit.snippet })]);
    button.addEventListener("click", () => openSession(hit.session_id));
    results.append(el("li", {}, [button]));
  }
  if (!data.hits.length) results.append(el("li", { class: "hint", text: "Nothing found." }));
}

// -- voice: the session's WebSocket with sentence audio (serve --tts) ------------------------------
// A voice turn follows the device rule: the socket carries it, and barge-in keeps what was heard.
// The page says how much it played (heard_ms); the service cuts the saved reply to it.
const voice = { ws: null, sid: null, queue: [], audio: null, playedMs: 0, expecting: null, bubble: null, reply: "",
                sentences: [], playing: -1, muted: false, done: null };

function voiceOn() { return $("voice").checked; }

function speaking() { return !!(voice.audio || voice.queue.length); }

function heardMs() { return voice.playedMs + (voice.audio ? voice.audio.currentTime * 1000 : 0); }

function setSpeaking() {
  document.body.dataset.speaking = speaking() ? "true" : "false";
  updateButtons();
}

function closeVoice() {
  stopAudio();
  if (voice.ws) { voice.ws.onclose = null; voice.ws.close(); }
  voice.ws = null;
  voice.sid = null;
}

function openVoice(sid) {
  if (voice.ws && voice.sid === sid && voice.ws.readyState === WebSocket.OPEN) return Promise.resolve(voice.ws);
  closeVoice();
  const protocols = ["conversation-session"];
  if (state.token) protocols.push("bearer." + state.token);  // never in the URL
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + sessionPath(sid, "/ws?audio=wav"), protocols);
  ws.binaryType = "blob";
  voice.ws = ws;
  voice.sid = sid;
  return new Promise((resolve, reject) => {
    let ready = false;
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") { onAudio(event.data); return; }
      const data = JSON.parse(event.data);
      if (data.type === "ready") {
        ready = true;
        if (data.audio !== "wav") say("This server does not speak (start it with --tts): replies come as text.");
        resolve(ws);
      } else {
        onVoiceEvent(data);
      }
    };
    ws.onclose = () => {
      if (voice.ws === ws) { voice.ws = null; voice.sid = null; }
      if (!ready) reject(new Error("the voice connection was refused (token?)"));
      else if (state.streaming && state.streaming.voice) { state.streaming = null; updateButtons(); }
    };
  });
}

function onAudio(blob) {
  if (voice.expecting === null || voice.muted) return;  // audio of a reply that was interrupted
  voice.queue.push({ blob, sentence: voice.expecting });
  voice.expecting = null;
  playNext();
}

function playNext() {
  if (voice.audio || !voice.queue.length) { setSpeaking(); return; }
  const clip = voice.queue.shift();
  const url = URL.createObjectURL(clip.blob);
  const audio = new Audio(url);
  voice.playing = clip.sentence;
  voice.audio = audio;
  const next = () => {
    if (voice.audio !== audio) return;
    voice.playedMs += (isFinite(audio.duration) ? audio.duration : audio.currentTime) * 1000;
    URL.revokeObjectURL(url);
    voice.audio = null;
    playNext();
  };
  audio.addEventListener("ended", next);
  audio.addEventListener("error", next);
  audio.play().catch(next);
  setSpeaking();
}

function stopAudio() {
  if (voice.audio) voice.audio.pause();
  voice.audio = null;
  voice.queue = [];
  voice.expecting = null;
  setSpeaking();
}

function onVoiceEvent(data) {
  if (data.type === "piece") {
    voice.reply += data.text;
    if (voice.bubble) { fillBody(voice.bubble, "assistant", voice.reply); scrollDown(); }
  } else if (data.type === "sentence") {
    voice.sentences.push(data.text);
  } else if (data.type === "audio") {
    voice.expecting = data.sentence;
  } else if (data.type === "done" || data.type === "interrupted") {
    if (data.type === "done") voice.done = { turn: data.turn, response: data.response };
    if (state.streaming && state.streaming.voice) state.streaming = null;
    updateButtons();
    if (voice.sid === state.sid) { openSession(state.sid, { follow: false }); refreshList(); }
  } else if (data.type === "error") {
    if (state.streaming && state.streaming.voice) state.streaming = null;
    say(data.message);
    updateButtons();
  }
}

async function sendVoice(sid, text) {
  const ws = await openVoice(sid);
  $("messages").append(messageNode("user", text));
  voice.bubble = startReply();
  voice.reply = "";
  voice.playedMs = 0;
  voice.sentences = [];
  voice.playing = -1;
  voice.done = null;
  stopAudio();
  voice.muted = false;
  state.streaming = { sid, voice: true, controller: { abort() {} } };
  updateButtons();
  ws.send(JSON.stringify({ type: "message", text }));
}

// Barge-in: playback stops at once; the service keeps the reply as far as it was heard.
// While the reply is written the service cuts it by the audio's real durations (heard_ms);
// once it is saved, the page, which may have buffered every sentence, says itself what it
// played: the sentences up to the one playing (it may have been heard: it stays).
function bargeIn() {
  const running = state.streaming && state.streaming.voice;
  if (!voice.ws || !(running || speaking())) return false;
  const heard = Math.round(heardMs());
  const done = voice.done;
  const text = done ? heardText(done.response) : null;
  stopAudio();
  voice.muted = true;  // the rest of this reply's audio, still arriving, is not played
  if (running || !done) {
    voice.ws.send(JSON.stringify({ type: "interrupt", heard_ms: heard }));
  } else {
    apiJson("POST", sessionPath(voice.sid, "/cut"), { heard: text, turn: done.turn })
      .then(() => { if (voice.sid === state.sid) { openSession(state.sid, { follow: false }); refreshList(); } })
      .catch(fail);
  }
  return true;
}

function heardText(reply) {
  let end = 0;
  for (let i = 0; i <= voice.playing && i < voice.sentences.length; i++) {
    const at = reply.indexOf(voice.sentences[i].trim(), end);
    if (at < 0) break;
    end = at + voice.sentences[i].trim().length;
  }
  return reply.slice(0, end);
}

// -- start ---------------------------------------------------------------------------------------------
async function start() {
  await refreshList();
  const sid = decodeURIComponent(location.hash.slice(1));
  if (sid) await openSession(sid);
  else renderSession();
}

function keyboard() {
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
    else if (event.key.length === 1 && speaking()) bargeIn();  // starting to type while it speaks
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      if (!$("token-panel").hidden) { $("token-panel").hidden = true; return; }
      if (!$("rename-form").hidden) { hideRename(); return; }
      if (state.streaming || speaking()) { event.preventDefault(); stop(); }
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("undo").addEventListener("click", undo);
  $("retry").addEventListener("click", retry);
  $("new-session").addEventListener("click", () => newSession().catch(fail));
  $("rename").addEventListener("click", showRename);
  $("rename-form").addEventListener("submit", rename);
  $("rename-cancel").addEventListener("click", hideRename);
  $("delete").addEventListener("click", remove);
  $("export-json").addEventListener("click", () => exportAs("json"));
  $("export-md").addEventListener("click", () => exportAs("md"));
  $("voice").addEventListener("change", () => {
    if (!voiceOn()) closeVoice();
    else if (state.sid) openVoice(state.sid).catch(fail);
  });
  $("stats").addEventListener("toggle", () => { if ($("stats").open) loadStats(); });
  $("search").addEventListener("input", onSearchInput);
  $("token-form").addEventListener("submit", saveToken);
  $("token-cancel").addEventListener("click", () => { $("token-panel").hidden = true; });
  $("change-token").addEventListener("click", () => askToken(""));
  $("toggle-list").addEventListener("click", () => {
    const shown = document.body.classList.toggle("show-list");
    $("toggle-list").setAttribute("aria-expanded", shown ? "true" : "false");
  });
  keyboard();
  updateButtons();
  start();
});
