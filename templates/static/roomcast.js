// roomcast.js: the browser client of roomcast, an ES module without dependencies.
// Its types are served beside it, generated from the server's own envelopes: /roomcast.d.ts.
//
//   import { Client } from "/roomcast.js";
//   const c = new Client("ws://127.0.0.1:8000", { username: "ann" });
//   c.on("chat", (m) => console.log(m.user.name, m.text));
//   await c.connect();
//   await c.join("lobby", { history: 20 });
//   const { offset } = await c.send("lobby", "hello");
//
// Semantics of the Python client (roomcast.client): after 1012, 4408, 4429 or a lost network
// it reconnects with capped exponential backoff and full jitter (at once on the browser's
// `online` event and when a hidden tab becomes visible), rejoins every room with `since`,
// never emits an offset twice, and re-sends what was not answered with its original `ref`.

const SUBPROTOCOL = "roomcast.v1";
const TOKEN_PREFIX = "roomcast.token.";
const FINAL = [1000, 1008, 1009, 4403]; // and 4401 without tokenRefresh
const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const CLIENT_KEY = "roomcast.client";
const MAX_DELAY = 2 ** 31 - 1; // setTimeout's limit

export class ClientError extends Error {
  constructor(code, detail, { ref = null, room = null, closeCode = null } = {}) {
    super(detail);
    this.name = "ClientError";
    this.code = code;
    this.detail = detail;
    this.ref = ref;
    this.room = room;
    this.closeCode = closeCode;
  }
}

// crypto.randomUUID needs a secure context; getRandomValues does not.
const uuid = () =>
  Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

// One id per tab: a reload keeps it (sessionStorage), another tab gets its own.
function tabId() {
  try {
    let id = sessionStorage.getItem(CLIENT_KEY);
    if (!ID_RE.test(id || "")) sessionStorage.setItem(CLIENT_KEY, (id = uuid()));
    return id;
  } catch {
    return uuid(); // storage disabled: stable for this page's life only
  }
}

// The token's `exp` in ms, read without verifying (the server does that).
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

function endpoint(url, path, query) {
  const u = new URL(url, globalThis.location ? location.href : undefined);
  u.protocol = u.protocol.replace(/^http/, "ws");
  const base = u.pathname.replace(/\/+$/, "");
  u.pathname = base.endsWith(path) ? base : base + path;
  for (const [k, v] of Object.entries(query)) if (v != null) u.searchParams.set(k, v);
  u.hash = "";
  return u.href;
}

function errorOf(m, closeCode = null) {
  return new ClientError(m.code, m.detail, { ref: m.ref, room: m.room, closeCode });
}

export class Client {
  constructor(url, options = {}) {
    const o = (this.options = { path: "/ws", timeout: 15, backoff: [0.5, 10], maxBuffer: 100, ...options });
    this.clientId = o.client || tabId();
    this.url = endpoint(url, o.path, { client: this.clientId, username: o.username });
    this.token = o.token || null;
    this.state = "closed";
    this.welcome = null;
    this.resent = 0; // requests sent again on a new connection, with their original `ref`
    this._l = new Map(); // event -> listeners
    this._rooms = new Map(); // joined (or joining) room -> last {epoch, offset} emitted
    this._pending = new Map(); // ref -> {msg, resolve, reject, gen}: in order
    this._rejoins = new Map(); // ref -> room
    this._gen = 0;
    this._ws = null;
    this._attempt = 0;
    this._wake = () => this._retry && this._open();
    this._seen = () => document.visibilityState === "visible" && this._wake();
  }

  /** Listen to a server envelope type, "state", "welcome" or "recoveryFailed"; returns `off`. */
  on(type, fn) {
    let set = this._l.get(type);
    if (!set) this._l.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  _emit(type, ...args) {
    for (const fn of [...(this._l.get(type) || [])]) {
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => { throw e; }); // the listener's bug: reported, not ours to swallow
      }
    }
  }

  _state(s, info = {}, always = false) {
    if (s === this.state && !always) return;
    this.state = s;
    this._emit("state", s, info);
  }

  /** Resolves with the first `welcome`; rejects on a final close. */
  connect() {
    if (!this._connecting) {
      this._connecting = new Promise((resolve, reject) => (this._hello = [resolve, reject]));
      this._connecting.catch(() => {}); // the caller may never await it
      this._closing = false;
      this._opened = false;
      globalThis.addEventListener?.("online", this._wake);
      globalThis.document?.addEventListener("visibilitychange", this._seen);
      this._planRefresh();
      this._open();
    }
    return this._connecting;
  }

  close() {
    this._closing = true;
    const ws = this._ws;
    this._detach();
    try {
      ws?.close(1000);
    } catch {}
    this._rooms.clear();
    this._final(new ClientError("closed", "The client was closed.", { closeCode: 1000 }));
  }

  /** Join `room`; replayed messages (`history`, or after `since`) are emitted first. */
  join(room, { history, since } = {}) {
    if (!this._rooms.has(room)) this._rooms.set(room, { epoch: null, offset: 0 });
    return this._request({ type: "join", room, ...(history != null && { history }), ...(since && { since }) });
  }

  leave(room) {
    return this._request({ type: "leave", room });
  }

  presence(room) {
    return this._request({ type: "presence", room });
  }

  /** Resolves with {room, offset} once stored, across reconnects (re-sent with its `ref`). */
  async send(room, text) {
    let chats = 0;
    for (const p of this._pending.values()) chats += p.msg.type === "chat";
    if (chats >= this.options.maxBuffer) {
      throw new ClientError("buffer_full", `${chats} chats wait to be sent (maxBuffer).`, { room });
    }
    const ack = await this._request({ type: "chat", room, text });
    return { room: ack.room, offset: ack.offset };
  }

  /** Send any envelope (an app's own type) now, without waiting for an answer. */
  push(envelope) {
    return this._tx(envelope);
  }

  _request(msg) {
    if (!this._connecting) return Promise.reject(new ClientError("closed", "Call connect() first."));
    msg.ref = uuid();
    return new Promise((resolve, reject) => {
      const p = { msg, resolve, reject, gen: 0 };
      this._pending.set(msg.ref, p);
      if (this.welcome && this._ws) this._transmit(p);
    });
  }

  _tx(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || !this._welcomed) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  _transmit(p) {
    if (p.gen && p.gen !== this._gen) this.resent++;
    if (this._tx(p.msg)) p.gen = this._gen;
  }

  // --- connections ---------------------------------------------------------

  async _open() {
    clearTimeout(this._retry);
    this._retry = 0;
    const gen = ++this._gen;
    this._state(this._opened ? "reconnecting" : "connecting");
    if (this._mustRefresh || this._due()) {
      try {
        await this._refresh();
      } catch (e) {
        return this._final(new ClientError("unauthorized", `tokenRefresh failed: ${e}`, { closeCode: 4401 }));
      }
      if (gen !== this._gen) return;
      this._planRefresh();
    }
    const protocols = [SUBPROTOCOL, ...(this.token ? [TOKEN_PREFIX + this.token] : [])];
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch (e) {
      return this._final(new ClientError("invalid_url", `Cannot open ${this.url}: ${e.message}`));
    }
    this._ws = ws;
    this._welcomed = false;
    this._lastError = null;
    this._pingAt = 0;
    this._rx = Date.now();
    ws.onmessage = (ev) => gen === this._gen && this._receive(ev.data);
    ws.onclose = (ev) => gen === this._gen && this._closed(ev.code, ev.reason);
    clearInterval(this._tick);
    this._tick = setInterval(() => this._beat(), 500);
  }

  // The heartbeat: a browser cannot see WebSocket pings, so after `heartbeat` s of silence
  // ask for a `pong`, and give the connection up when nothing comes within another.
  _beat() {
    const now = Date.now();
    const limit = 1000 * (this._welcomed ? this.welcome.heartbeat : this.options.timeout);
    if (this._pingAt && this._rx < this._pingAt) {
      if (now - this._pingAt >= limit) this._drop("no answer to ping");
    } else if (now - this._rx >= limit) {
      if (!this._welcomed) return this._drop("no welcome");
      this._pingAt = now;
      this._tx({ type: "ping", ref: (this._pingRef = "hb-" + uuid()) });
    }
  }

  _detach() {
    this._gen++;
    clearInterval(this._tick);
    clearTimeout(this._retry);
    this._retry = 0;
    const ws = this._ws;
    this._ws = null;
    this._welcomed = false;
    if (ws) ws.onmessage = ws.onclose = null;
    return ws;
  }

  _drop(reason) {
    try {
      this._detach()?.close(4000, reason);
    } catch {}
    this._closed(1006, reason);
  }

  _closed(code, reason) {
    const last = this._lastError;
    this._detach();
    this._rejoins.clear();
    if (this._closing) return;
    const refused = code === 4401 && (!this.options.tokenRefresh || this._refused);
    if (FINAL.includes(code) || refused) {
      const error = last ? errorOf(last, code) : new ClientError("closed", reason || `closed (${code})`, { closeCode: code });
      return this._final(error);
    }
    this._refused = this._mustRefresh = code === 4401;
    // 4429: the server is busy, start later in the backoff.
    const n = Math.min(this._attempt++ + (code === 4429 ? 3 : 0), 20);
    const [base, cap] = this.options.backoff;
    const error = last ? errorOf(last, code) : undefined;
    this._state(this._opened ? "reconnecting" : "connecting", { code, reason, error }, true);
    this._retry = setTimeout(() => this._open(), Math.random() * 1000 * Math.min(cap, base * 2 ** n));
  }

  _final(error) {
    this._detach();
    clearTimeout(this._tokenTimer);
    globalThis.removeEventListener?.("online", this._wake);
    globalThis.document?.removeEventListener("visibilitychange", this._seen);
    this._connecting = null;
    this._hello?.[1](error);
    for (const p of this._pending.values()) p.reject(error);
    this._pending.clear();
    this._state("closed", { code: error.closeCode, error });
  }

  // --- what the server sends -----------------------------------------------

  _receive(data) {
    this._rx = Date.now();
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return;
    }
    if (!m || typeof m.type !== "string") return;
    const ref = m.ref ?? null;
    const p = ref !== null ? this._pending.get(ref) : undefined;
    const pos = this._rooms.get(m.room);
    switch (m.type) {
      case "welcome":
        return this._welcome(m);
      case "chat":
      case "notification":
        if (pos && typeof m.offset === "number") {
          if (pos.epoch === m.epoch && m.offset <= pos.offset) return; // emitted already
          pos.epoch = m.epoch;
          pos.offset = m.offset;
        }
        break;
      case "joined":
        if (pos && (pos.epoch !== m.epoch || pos.offset < m.offset)) Object.assign(pos, { epoch: m.epoch, offset: m.offset });
        if (this._rejoins.delete(ref)) {
          this._emit("joined", m);
          if (!m.recovered) this._emit("recoveryFailed", { room: m.room, joined: m });
          return;
        }
        break;
      case "left":
        if (p) this._rooms.delete(m.room);
        break;
      case "pong":
        if (ref === this._pingRef) return;
        break;
      case "ack":
        if (!p) return; // a repeated ack of a chat already answered
        break;
      case "error":
        if (this._rejoins.has(ref)) {
          this._rooms.delete(this._rejoins.get(ref));
          this._rejoins.delete(ref);
        } else if (p?.msg.type === "join" && this._rooms.get(p.msg.room)?.epoch === null) {
          this._rooms.delete(p.msg.room);
        } else if (ref === null) this._lastError = m;
    }
    if (p) {
      this._pending.delete(ref);
      return m.type === "error" ? p.reject(errorOf(m)) : p.resolve(m);
    }
    this._emit(m.type, m);
  }

  _welcome(m) {
    this.welcome = m;
    this._welcomed = true;
    this._opened = true;
    this._attempt = 0;
    this._refused = false;
    this._emit("welcome", m);
    // Rejoin every room from the last offset emitted, then (re-)send what waits, in order.
    for (const [room, pos] of this._rooms) {
      if (pos.epoch === null) continue; // its own join request is re-sent below
      const ref = uuid();
      this._rejoins.set(ref, room);
      this._tx({ type: "join", room, since: { epoch: pos.epoch, offset: pos.offset }, ref });
    }
    for (const p of this._pending.values()) this._transmit(p);
    this._state("open");
    this._hello[0](m);
  }

  // --- tokens --------------------------------------------------------------

  _due() {
    const exp = this.options.tokenRefresh && this.token ? tokenExpiry(this.token) : null;
    return exp !== null && exp - Date.now() < margin(exp - Date.now());
  }

  async _refresh() {
    this._mustRefresh = false;
    this.token = await this.options.tokenRefresh();
  }

  // Before `exp`, get a new token and send `refresh` on the open connection.
  _planRefresh() {
    clearTimeout(this._tokenTimer);
    const exp = this.options.tokenRefresh && this.token ? tokenExpiry(this.token) : null;
    if (exp === null) return;
    const left = exp - Date.now();
    this._tokenTimer = setTimeout(async () => {
      if (!this._due()) return this._planRefresh(); // a timer clamped to MAX_DELAY
      try {
        await this._refresh();
      } catch (e) {
        return console.warn("roomcast: tokenRefresh failed; the connection ends at the token's exp", e);
      }
      if (!(tokenExpiry(this.token) > exp)) return console.warn("roomcast: tokenRefresh gave no later exp");
      this._tx({ type: "refresh", token: this.token, ref: uuid() });
      this._planRefresh();
    }, Math.min(MAX_DELAY, Math.max(0, left - margin(left))));
  }
}

// How long before `exp` to refresh: a quarter of what is left, within 1-60 s.
const margin = (left) => Math.min(60000, Math.max(1000, left / 4));
