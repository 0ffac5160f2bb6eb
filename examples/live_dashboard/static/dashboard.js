// The live dashboard's page: roomcast's wire protocol, straight over a WebSocket.
// It joins the room `metrics` with the last 60 samples, draws each new one, and after a
// lost connection rejoins with `since` its last offset, so the chart has no gap.

const ROOM = "metrics";
const MAX_POINTS = 120;
const endpoint = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/rt/ws`;

const $ = (id) => document.getElementById(id);
const points = []; // {offset, load}
let position = null; // {epoch, offset} of the last sample drawn
let sinceSent = false;
let attempt = 0;

const dashboard = { socket: null, gaps: 0 };
window.dashboard = dashboard;

function status(text, online) {
  $("status").textContent = text;
  $("status").classList.toggle("online", online);
}

function join(socket) {
  const request = { type: "join", room: ROOM, ref: crypto.randomUUID() };
  sinceSent = position !== null;
  if (sinceSent) request.since = position;
  else request.history = 60;
  socket.send(JSON.stringify(request));
}

function add(sample) {
  if (position && sample.epoch === position.epoch) {
    if (sample.offset <= position.offset) return; // already drawn
    if (sample.offset !== position.offset + 1) dashboard.gaps += 1;
  }
  position = { epoch: sample.epoch, offset: sample.offset };
  points.push({ offset: sample.offset, load: Number(sample.data?.load ?? 0) });
  if (points.length > MAX_POINTS) points.shift();
  $("load").textContent = String(sample.data?.load ?? "–");
  $("memory").textContent = String(sample.data?.memory_mb ?? "–");
  $("viewers").textContent = String(sample.data?.viewers ?? "–");
  draw();
}

function draw() {
  const top = Math.max(1, ...points.map((p) => p.load)) * 1.2;
  const step = 600 / (MAX_POINTS - 1);
  const coords = points.map((p, i) => `${(i * step).toFixed(1)},${(200 - (p.load / top) * 200).toFixed(1)}`);
  $("line").setAttribute("points", coords.join(" "));
  const chart = $("chart");
  chart.dataset.count = String(points.length);
  chart.dataset.offsets = points.map((p) => p.offset).join(",");
  $("count").textContent = String(points.length);
  $("first").textContent = points.length ? String(points[0].offset) : "–";
  $("last").textContent = points.length ? String(points[points.length - 1].offset) : "–";
}

function reset() {
  points.length = 0;
  position = null;
  draw();
}

function connect() {
  const socket = new WebSocket(endpoint, ["roomcast.v1"]);
  dashboard.socket = socket;
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    switch (message.type) {
      case "welcome":
        attempt = 0;
        join(socket);
        break;
      case "joined":
        if (sinceSent && !message.recovered) {
          reset(); // history was lost or trimmed: start again from the recent samples
          join(socket);
        } else {
          status("online", true);
        }
        break;
      case "notification":
        if (message.room === ROOM && message.offset !== null) add(message);
        break;
      case "error":
        status(`error: ${message.detail}`, false);
        break;
    }
  };
  socket.onclose = () => {
    status("reconnecting…", false);
    const delay = Math.random() * Math.min(10_000, 250 * 2 ** attempt++);
    setTimeout(connect, delay);
  };
}

connect();
