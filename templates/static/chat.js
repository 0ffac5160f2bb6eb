// The chat page, on roomcast.js alone: pick a name (or paste a token) and a room, chat,
// see who is online. Loaded as a module, so the page runs under a strict CSP.
import { Client, tokenExpiry } from "../roomcast.js";

const HISTORY = 50; // messages shown when joining (or reloading) a room
const MAX_SHOWN = 1000; // message elements kept in the page
const ROOM_RE = /^[A-Za-z0-9_.:\-]{1,64}$/;
const JWT_RE = /^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*$/;
const TOKEN_KEY = "roomcast.token"; // sessionStorage: this tab only
const GAP = "Some messages could not be recovered; recent history was reloaded.";

const $ = (id) => document.getElementById(id);
const el = Object.fromEntries(
  ["status", "where", "current-room", "leave", "me", "join-form", "name", "token", "token-label",
   "name-label", "room-label", "room", "connect", "notice", "log", "messages", "pending",
   "composer", "text", "online", "online-count"].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), $(id)]),
);
const AUTH = document.body.dataset.auth === "true";
const MAX_TEXT = Number(document.body.dataset.maxTextChars);
const MAX_NAME = Number(document.body.dataset.maxNameChars);

const store = {
  get: (s, k) => { try { return s.getItem(k); } catch { return null; } },
  set: (s, k, v) => { try { s.setItem(k, v); } catch { /* storage disabled */ } },
  del: (s, k) => { try { s.removeItem(k); } catch { /* storage disabled */ } },
};

let client = null; // one per session (name or token); rooms are switched on it
let room = null;
let shown = new Map(); // "epoch:offset" -> element
let online = new Map(); // user id -> user
let renew = null; // resolves tokenRefresh with the token the user pastes
let lastState = {};

// --- rendering: user text only ever through textContent ---
function node(tag, className, text) {
  const n = document.createElement(tag);
  if (className) n.className = className;
  if (text != null) n.textContent = String(text);
  return n;
}

function timeOf(ts) {
  const d = new Date(ts);
  return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function status(state, text) {
  el.status.dataset.state = state;
  el.status.textContent = text;
}

function notice(text, kind = "info") {
  el.notice.textContent = text || "";
  el.notice.dataset.kind = kind;
}

function append(element) {
  const near = el.log.scrollHeight - el.log.scrollTop - el.log.clientHeight < 80;
  el.messages.appendChild(element);
  if (near) el.log.scrollTop = el.log.scrollHeight;
}

function systemLine(text, extra = "") {
  append(node("div", `system ${extra}`.trim(), text));
}

// A stored message, once per epoch:offset, in offset order within its epoch.
function place(m, element) {
  const key = `${m.epoch}:${m.offset}`;
  if (shown.has(key)) return;
  element.dataset.offset = String(m.offset);
  element.dataset.epoch = m.epoch;
  const after = [...shown.values()].find((e) => e.dataset.epoch === m.epoch && Number(e.dataset.offset) > m.offset);
  if (after) el.messages.insertBefore(element, after);
  else append(element);
  shown.set(key, element);
  while (shown.size > MAX_SHOWN) {
    const [oldest, e] = shown.entries().next().value;
    e.remove();
    shown.delete(oldest);
  }
}

function renderChat(m) {
  const item = node("div", "msg chat");
  if (client?.welcome && m.user.id === client.welcome.user.id) item.classList.add("mine");
  item.dataset.userId = m.user.id;
  const meta = node("div", "meta");
  const time = node("time", "ts", timeOf(m.ts));
  time.setAttribute("datetime", m.ts);
  meta.append(node("span", "who", m.user.name), time);
  item.append(meta, node("div", "text", m.text));
  return item;
}

function renderNotification(m) {
  const level = ["info", "success", "warning", "error"].includes(m.level) ? m.level : "info";
  const item = node("div", `msg notification level-${level}`);
  const meta = node("div", "meta");
  meta.append(node("span", "title", m.title), node("time", "ts", timeOf(m.ts)));
  item.append(meta, node("div", "text", m.body));
  return item;
}

function renderOnline(count) {
  const me = client?.welcome?.user.id;
  const users = [...online.values()].sort((a, b) => (b.id === me) - (a.id === me) || a.name.localeCompare(b.name));
  el.online.replaceChildren(...users.map((u) => {
    const li = node("li", u.id === me ? "me" : "", u.name);
    li.dataset.userId = u.id;
    li.title = u.id;
    return li;
  }));
  el.onlineCount.textContent = count == null ? "…" : String(count);
}

function showOnline(users, count) {
  online = new Map(users.map((u) => [u.id, u]));
  el.online.parentElement.removeAttribute("data-stale");
  renderOnline(count);
}

// While reconnecting nobody is known to be online: clear the list until the rejoin says.
function staleOnline() {
  online.clear();
  el.online.parentElement.dataset.stale = "true";
  renderOnline(null);
}

function clearRoom() {
  el.messages.replaceChildren();
  el.pending.replaceChildren();
  shown = new Map();
  staleOnline();
}

function joinedView(joined) {
  el.joinForm.hidden = true;
  el.where.hidden = false;
  el.currentRoom.textContent = joined ? joined.room : room;
}

function formView(focus) {
  el.joinForm.hidden = false;
  el.joinForm.dataset.mode = "join";
  el.roomLabel.hidden = false;
  el.connect.textContent = "Join";
  el.where.hidden = true;
  focus?.focus();
}

// --- the session ---
function base() {
  return new URL(".", location.href).href; // works wherever roomcast is mounted
}

function start(name, token) {
  client?.close();
  const c = (client = new Client(base(), {
    username: AUTH ? undefined : name || undefined,
    token: token || undefined,
    tokenRefresh: AUTH ? askForToken : undefined,
  }));
  const live = (fn) => (...args) => c === client && fn(...args);
  c.on("state", live(onState));
  c.on("welcome", live((w) => { el.me.textContent = AUTH ? w.user.name : ""; }));
  c.on("chat", live((m) => m.room === room && place(m, renderChat(m))));
  c.on("notification", live((m) => {
    if (m.room === null) append(renderNotification(m)); // to this user, not stored
    else if (m.room === room) place(m, renderNotification(m));
  }));
  c.on("system", live(onSystem));
  c.on("joined", live((j) => j.room === room && showOnline(j.presence, j.online)));
  c.on("recoveryFailed", live(({ room: lost }) => lost === room && reload()));
  c.on("error", live((e) => {
    if (e.code === "rate_limited") return systemLine(e.detail, "error");
    notice(`${e.code}: ${e.detail}`, "error");
  }));
  c.connect().catch(() => {}); // a final close is shown by onState
  return c;
}

async function enter(target) {
  const c = client;
  room = target;
  clearRoom();
  joinedView();
  try {
    const joined = await c.join(target, { history: HISTORY });
    if (c !== client || room !== target) return;
    showOnline(joined.presence, joined.online);
    notice("");
    status("online", `online · ${target}`);
  } catch (err) {
    if (c !== client || err.code === "closed" || err.closeCode) return;
    notice(`Cannot join ${target}: ${err.detail}${err.code === "forbidden" ? " Pick a room your token permits." : ""}`, "error");
    systemLine(`Cannot join (${err.code}): ${err.detail}`, "error");
    room = null;
    status("disconnected", "not joined");
    formView(el.room);
  }
}

// The room's history was lost (a restart on memory history, or a gap too old): keep what
// is on screen, mark the gap once, and show the room's recent history after it.
async function reload() {
  const c = client;
  const target = room;
  const last = el.messages.lastElementChild;
  if (!last || !last.classList.contains("gap")) append(node("div", "system gap", GAP));
  try {
    await c.leave(target);
    const joined = await c.join(target, { history: HISTORY });
    if (c === client && room === target) showOnline(joined.presence, joined.online);
  } catch (err) {
    if (c === client) systemLine(`Reload failed (${err.code}): ${err.detail}`, "error");
  }
}

function onState(state, info) {
  lastState = info;
  if (state === "open") {
    if (room) status("online", `online · ${room}`);
    else status("connecting", "connected");
    if (!renew) notice("");
  } else if (state === "connecting" || state === "reconnecting") {
    staleOnline();
    status(state, state === "connecting" ? "connecting…" : "reconnecting…");
  } else if (state === "closed") {
    staleOnline();
    el.onlineCount.textContent = "0";
    const error = info.error;
    if (!error || error.code === "closed" && info.code === 1000) return status("idle", "not connected");
    status("disconnected", `disconnected (${info.code ?? error.code})`);
    if (error.code === "origin_not_allowed") {
      notice(`This page's origin is not allowed by the server (ALLOWED_ORIGINS): ${error.detail}`, "error");
    } else if (info.code === 4401) {
      tokenRefused(error.detail);
    } else if (info.code === 4403) {
      notice(`This room is not permitted: ${error.detail}`, "error");
    } else notice(`Disconnected (${info.code ?? error.code}): ${error.detail}`, "error");
    room = null;
    formView(AUTH ? el.token : el.room);
  }
}

function onSystem(m) {
  if (m.room !== room) return;
  if (m.event === "join") online.set(m.user.id, m.user);
  else online.delete(m.user.id);
  systemLine(`${m.user.name} ${m.event === "join" ? "joined" : "left"}`);
  renderOnline(m.online);
}

// --- tokens (JWT_SECRET mode) ---
function tokenRefused(detail) {
  store.del(sessionStorage, TOKEN_KEY); // a reload must not present it again
  el.me.textContent = "";
  notice(el.token.value
    ? `Your token was refused: ${detail} Paste a new one into Token and join again.`
    : "This server needs a token (JWT_SECRET is set): paste one into Token and join.", "error");
  el.token.select();
}

// roomcast.js asks before the token's `exp`, and after a 4401: the user pastes a new one.
function askForToken() {
  const exp = tokenExpiry(client?.token || "");
  const secs = exp === null ? 0 : Math.round((exp - Date.now()) / 1000);
  if (lastState.code === 4401 || secs <= 0) {
    store.del(sessionStorage, TOKEN_KEY); // a reload must not present it again
    const why = lastState.code === 4401 ? `was refused: ${lastState.error?.detail ?? ""}` : "has expired.";
    notice(`Your token ${why} Paste a new one into Token.`, "error");
  } else {
    notice(`Your token expires in ${Math.max(0, secs)} s: paste a new one into Token to stay connected.`);
  }
  el.joinForm.hidden = false;
  el.joinForm.dataset.mode = "renew";
  el.roomLabel.hidden = true;
  el.connect.textContent = "Renew";
  el.token.value = "";
  el.token.focus();
  return new Promise((resolve) => (renew = resolve));
}

function renewed(token) {
  const resolve = renew;
  renew = null;
  store.set(sessionStorage, TOKEN_KEY, token);
  resolve(token);
  notice("Token renewed.");
  if (room) joinedView();
}

function claims(token) {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return {};
  }
}

// `#token=<JWT>`: a fragment never reaches the server's logs. Kept for this tab, and taken
// out of the address bar at once.
function fragmentToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!AUTH || !fragment.has("token")) return "";
  const token = (fragment.get("token") || "").trim();
  fragment.delete("token");
  const rest = fragment.toString();
  history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  if (token) store.set(sessionStorage, TOKEN_KEY, token);
  return token;
}

// --- the forms ---
el.joinForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = AUTH ? el.token.value.trim() : "";
  if (token && !JWT_RE.test(token)) {
    el.token.setAttribute("aria-invalid", "true");
    notice("That is not a JWT: paste the whole token (three parts separated by dots).", "error");
    return el.token.focus();
  }
  el.token.removeAttribute("aria-invalid");
  if (AUTH && !token) {
    notice("This server needs a token (JWT_SECRET is set): paste one into Token and join.", "error");
    return el.token.focus();
  }
  if (renew) {
    if (claims(token).sub === client?.welcome?.user.id) return renewed(token);
    renew = null; // another user's token: a new session as that user
  }
  const target = el.roomLabel.hidden ? room : el.room.value.trim();
  if (!target || !ROOM_RE.test(target)) {
    el.room.setAttribute("aria-invalid", "true");
    notice("Room names are 1 to 64 characters of A-Z a-z 0-9 _ - . : (no spaces).", "error");
    return el.room.focus();
  }
  el.room.removeAttribute("aria-invalid");
  const name = AUTH ? "" : el.name.value.trim().slice(0, MAX_NAME);
  if (token) store.set(sessionStorage, TOKEN_KEY, token);
  if (!AUTH) store.set(localStorage, "roomcast.name", name);
  store.set(localStorage, "roomcast.room", target);
  notice("");
  start(name, token);
  enter(target);
  el.text.focus();
});

el.leave.addEventListener("click", () => {
  const c = client;
  client = null;
  room = null;
  c?.close();
  clearRoom();
  el.onlineCount.textContent = "0";
  status("idle", "not connected");
  store.del(localStorage, "roomcast.room");
  formView(el.room);
});

el.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = el.text.value;
  if (!text.trim() || !client || !room) return;
  if (text.length > MAX_TEXT) return notice(`Messages are at most ${MAX_TEXT} characters.`, "error");
  const pending = node("div", "pending-msg", text);
  el.pending.appendChild(pending);
  el.text.value = "";
  el.log.scrollTop = el.log.scrollHeight;
  client.send(room, text).then(
    () => pending.remove(),
    (err) => {
      pending.remove();
      if (err.code !== "closed") systemLine(`Not sent (${err.code}): ${err.detail}`, "error");
    },
  );
});

el.room.addEventListener("input", () => {
  if (ROOM_RE.test(el.room.value.trim())) el.room.removeAttribute("aria-invalid");
});
window.addEventListener("hashchange", () => {
  const token = fragmentToken();
  if (!token) return;
  el.token.value = token;
  if (renew && claims(token).sub === client?.welcome?.user.id) renewed(token);
  else notice("Token received: press Join to use it.");
});

// Initial values: ?room= in the URL wins, then what was used last. Someone who joined before
// comes straight back (with a token, when one is needed).
const wanted = new URLSearchParams(location.search).get("room") || store.get(localStorage, "roomcast.room");
if (wanted && ROOM_RE.test(wanted)) el.room.value = wanted;
el.name.value = store.get(localStorage, "roomcast.name") || "";
if (AUTH) el.token.value = fragmentToken() || store.get(sessionStorage, TOKEN_KEY) || "";
window.roomcast = { get client() { return client; }, get room() { return room; } }; // for tests
if (wanted && ROOM_RE.test(wanted) && (!AUTH || el.token.value)) el.joinForm.requestSubmit();
else (AUTH ? el.token : el.name).focus();
