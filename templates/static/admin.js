// roomcast's admin page: reads the HTTP API with the key typed into the page.
//
// The key is kept in sessionStorage (this tab only) and sent as a bearer token;
// it never goes into a URL. Every URL is relative to the page, so the page works
// wherever roomcast is mounted. Whatever users wrote is shown with textContent:
// data, never markup.

const KEY = "roomcast.admin.key";
const REFRESH_MS = 2000;
const HISTORY_SHOWN = 50;
const ROOMS_SHOWN = 100;
const PREFIX = /^[A-Za-z0-9_.:-]{0,64}$/;
const CHART = { width: 600, height: 160, top: 6, bottom: 2 };

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

const state = { timer: null, room: null, roomTop: null, roomEpoch: null, filter: "", running: false };

// --- talking to the API --------------------------------------------------------

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached.");
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // not JSON: described by the status below
  }
  if (!response.ok) {
    const detail = answer?.detail ?? `The server answered HTTP ${response.status}.`;
    throw new ApiError(response.status, answer?.error ?? "http_error", detail);
  }
  return answer;
}

const roomPath = (room) => `api/rooms/${encodeURIComponent(room)}`;

function describe(error) {
  if (!(error instanceof ApiError)) return `Unexpected error: ${error}`;
  switch (error.status) {
    case 0:
      return "The server cannot be reached: is it running? Retrying every 2 s.";
    case 401:
      return "Wrong API key: the server refused it. Enter the key set in API_KEY.";
    case 404:
      return error.code === "not_found" && /API_KEY/.test(error.message)
        ? "The HTTP API is off on this server: set API_KEY (16 characters or more) and restart it."
        : error.message;
    case 503:
      return "The broker or a store did not answer: retrying every 2 s.";
    default:
      return `${error.message} (HTTP ${error.status})`;
  }
}

// --- page state -------------------------------------------------------------------

function show(element, text) {
  element.textContent = text ?? "";
  element.hidden = !text;
}

function setState(name, text = name) {
  const pill = $("state");
  pill.dataset.state = name;
  pill.textContent = text;
}

function lock(message) {
  clearTimeout(state.timer);
  state.timer = null;
  state.running = false;
  sessionStorage.removeItem(KEY);
  $("dashboard").hidden = true;
  $("forget").hidden = true;
  $("key-form").hidden = false;
  show($("warning"), "");
  show($("error"), message);
  setState("locked");
  $("key").focus();
}

function apiOff() {
  $("key-form").hidden = true;
  $("dashboard").hidden = true;
  show($("error"), describe(new ApiError(404, "not_found", "API_KEY")));
  setState("error", "API off");
}

// A failure of the whole page (not of one request's answer): a wrong key locks it.
function failed(error) {
  if (error instanceof ApiError && error.status === 401) {
    lock(describe(error));
  } else if (error instanceof ApiError && error.status === 404 && error.code === "not_found") {
    clearTimeout(state.timer);
    state.running = false;
    apiOff();
  } else {
    show($("error"), describe(error));
    setState("error");
  }
}

// --- the figures ------------------------------------------------------------------

function renderStats(stats) {
  for (const name of [
    "connections", "rooms", "users", "messages_in_per_s", "deliveries_per_s",
    "slow_consumers_total", "broker", "history", "workers",
  ]) {
    const tile = $(`stat-${name}`);
    tile.textContent = String(stats[name]);
    if (typeof stats[name] === "string") tile.dataset.state = stats[name];
  }
  const warnings = [];
  if (stats.broker !== "connected") {
    warnings.push(
      "The broker is reconnecting: other workers cannot answer, so the figures are this worker's only.",
    );
  }
  if (stats.history !== "connected") {
    warnings.push("The history store does not answer: messages cannot be stored or read.");
  }
  show($("warning"), warnings.join(" "));
  if (stats.series) renderChart(stats.series);
  return warnings.length === 0;
}

function points(values, max) {
  const { width, height, top, bottom } = CHART;
  const step = values.length > 1 ? width / (values.length - 1) : width;
  return values
    .map((v, i) => {
      const y = height - bottom - (v / max) * (height - top - bottom);
      return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
}

function renderChart(series) {
  const maxConnections = Math.max(0, ...series.connections);
  const maxDeliveries = Math.max(0, ...series.deliveries);
  $("line-connections").setAttribute("points", points(series.connections, Math.max(1, maxConnections)));
  $("line-deliveries").setAttribute("points", points(series.deliveries, Math.max(1, maxDeliveries)));
  $("max-connections").textContent = String(maxConnections);
  $("max-deliveries").textContent = String(maxDeliveries);
}

function renderRooms(rooms) {
  const rows = rooms.map(({ room, online, offset, epoch }) => {
    const row = document.createElement("tr");
    row.dataset.room = room;
    row.classList.toggle("open", room === state.room);
    const name = document.createElement("td");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "link";
    open.textContent = room;
    open.addEventListener("click", () => openRoom(room));
    name.append(open);
    row.append(name, cell(online, "num"), cell(offset, "num"), cell(epoch, "epoch"));
    return row;
  });
  $("room-rows").replaceChildren(...rows);
  $("rooms-empty").hidden = rows.length > 0;
}

function cell(value, className) {
  const td = document.createElement("td");
  td.className = className;
  td.textContent = String(value);
  return td;
}

// --- one room ---------------------------------------------------------------------

function openRoom(room) {
  state.room = room;
  state.roomTop = state.roomEpoch = null;
  $("room-name").textContent = room;
  $("users").replaceChildren();
  $("history").replaceChildren();
  $("room-online").textContent = "0";
  show($("room-result"), "");
  show($("room-error"), "");
  $("room").hidden = false;
  for (const row of $("room-rows").children) row.classList.toggle("open", row.dataset.room === room);
  refreshRoom().catch((error) => report($("room-error"), error));
}

function closeRoom() {
  state.room = null;
  $("room").hidden = true;
  for (const row of $("room-rows").children) row.classList.remove("open");
}

async function refreshRoom() {
  const room = state.room;
  if (room === null) return;
  const [presence, head] = await Promise.all([
    api(`${roomPath(room)}/presence`),
    api(`${roomPath(room)}/history?since=0&limit=1`),
  ]);
  if (room !== state.room) return; // another room was opened meanwhile
  renderUsers(presence);
  if (head.offset !== state.roomTop || head.epoch !== state.roomEpoch) {
    const since = Math.max(0, head.offset - HISTORY_SHOWN);
    const page = await api(`${roomPath(room)}/history?since=${since}&limit=${HISTORY_SHOWN}`);
    if (room !== state.room) return;
    state.roomTop = page.offset;
    state.roomEpoch = page.epoch;
    renderHistory(page.messages);
  }
}

function renderUsers({ online, users }) {
  $("room-online").textContent = String(online);
  $("users").replaceChildren(
    ...users.map((user) => {
      const li = document.createElement("li");
      li.dataset.userId = user.id;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = user.name;
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = user.id;
      who.append(id);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger";
      button.textContent = "Disconnect";
      button.addEventListener("click", () => disconnect(user));
      li.append(who, button);
      return li;
    }),
  );
}

function renderHistory(messages) {
  const items = messages.map((message) => {
    const li = document.createElement("li");
    li.className = message.type;
    li.dataset.offset = String(message.offset);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `#${message.offset} ${String(message.ts ?? "").slice(11, 19)}`;
    const who = document.createElement("span");
    who.className = "who";
    const text = document.createElement("span");
    text.className = "text";
    if (message.type === "chat") {
      who.textContent = message.user?.name ?? "";
      text.textContent = message.text;
    } else if (message.type === "notification") {
      who.textContent = `[${message.level}] ${message.title}`;
      text.textContent = message.body;
    } else {
      who.textContent = message.type;
      text.textContent = JSON.stringify(message);
    }
    li.append(meta, who, text);
    return li;
  });
  $("history").replaceChildren(...items);
  $("history-empty").hidden = items.length > 0;
  $("history").scrollTop = $("history").scrollHeight;
}

async function disconnect(user) {
  const room = state.room;
  const question = `Disconnect ${user.name} (${user.id})? Every connection of this user, in every room, is closed with 4401.`;
  if (!window.confirm(question)) return;
  try {
    const { disconnected } = await api(`api/users/${encodeURIComponent(user.id)}/disconnect`, {
      method: "POST",
    });
    if (room === state.room) {
      show($("room-result"), `Disconnected ${disconnected} connection(s) of ${user.name}.`);
    }
    await refreshRoom();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) failed(error);
    else show($("room-result"), `Not disconnected: ${describe(error)}`);
  }
}

async function publish(event) {
  event.preventDefault();
  const room = state.room;
  if (room === null) return;
  const body = {
    type: "notification",
    title: $("publish-title").value,
    body: $("publish-body").value,
    level: $("publish-level").value,
  };
  try {
    const { offset } = await api(`${roomPath(room)}/publish`, { method: "POST", body });
    show($("room-result"), `Published in ${room} as #${offset}.`);
    $("publish-title").value = "";
    $("publish-body").value = "";
    await refreshRoom();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) failed(error);
    else show($("room-result"), `Not published: ${describe(error)}`);
  }
}

// --- the refresh loop -------------------------------------------------------------

// A part of the page that could not be read says so where it is shown; a wrong
// key or an API turned off is the whole page's failure.
function report(element, error) {
  if (error instanceof ApiError && (error.status === 401 || error.status === 404)) failed(error);
  else show(element, describe(error));
}

async function refresh() {
  const prefix = state.filter;
  const query = `prefix=${encodeURIComponent(prefix)}&limit=${ROOMS_SHOWN}`;
  const [stats, rooms, room] = await Promise.allSettled([
    api("api/stats?series=1"),
    api(`api/rooms?${query}`),
    refreshRoom(),
  ]);
  if (stats.status === "rejected") throw stats.reason;
  const healthy = renderStats(stats.value);
  $("dashboard").hidden = false;
  $("forget").hidden = false;
  show($("error"), "");
  if (rooms.status === "fulfilled") {
    show($("rooms-error"), "");
    if (prefix === state.filter) renderRooms(rooms.value.rooms);
  } else {
    report($("rooms-error"), rooms.reason);
  }
  if (room.status === "fulfilled") show($("room-error"), "");
  else report($("room-error"), room.reason);
  if (!state.running) return; // locked by a refused key meanwhile
  const whole = healthy && rooms.status === "fulfilled" && room.status === "fulfilled";
  setState(whole ? "live" : "warning", whole ? "live" : "degraded");
}

async function loop() {
  if (!state.running) return;
  try {
    await refresh();
  } catch (error) {
    failed(error);
  }
  if (state.running) state.timer = setTimeout(loop, REFRESH_MS);
}

function start() {
  $("key-form").hidden = true;
  setState("connecting", "connecting");
  state.running = true;
  clearTimeout(state.timer);
  loop();
}

function onFilter() {
  const value = $("filter").value.trim();
  if (!PREFIX.test(value)) {
    show($("filter-error"), "A room name prefix uses only A-Z a-z 0-9 _ - . : (up to 64).");
    return;
  }
  show($("filter-error"), "");
  state.filter = value;
  if (state.running) {
    api(`api/rooms?prefix=${encodeURIComponent(value)}&limit=${ROOMS_SHOWN}`)
      .then((answer) => {
        if (value === state.filter) renderRooms(answer.rooms);
      })
      .catch((error) => report($("rooms-error"), error));
  }
}

function init() {
  if (document.body.dataset.api === "off") {
    apiOff();
    return;
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    show($("error"), "");
    start();
  });
  $("forget").addEventListener("click", () => lock(""));
  $("filter").addEventListener("input", onFilter);
  $("room-close").addEventListener("click", closeRoom);
  $("publish").addEventListener("submit", publish);
  if (sessionStorage.getItem(KEY)) start();
  else lock("");
}

init();
