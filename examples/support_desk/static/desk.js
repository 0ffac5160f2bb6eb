// The desk's page: roomcast's protocol straight over a WebSocket. The session cookie
// travels with the WebSocket's handshake, so the server's on_connect hook knows who we are.

const room = document.body.dataset.room || null;
const endpoint = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/rt/ws`;
const $ = (id) => document.getElementById(id);
let position = null; // {epoch, offset} of the last message shown
let attempt = 0;
const desk = { socket: null };
window.desk = desk;

function status(text, online) {
  $("status").textContent = text;
  $("status").classList.toggle("online", online);
}

function show(chat) {
  if (position && chat.epoch === position.epoch && chat.offset <= position.offset) return;
  position = { epoch: chat.epoch, offset: chat.offset };
  const item = document.createElement("li");
  item.dataset.offset = String(chat.offset);
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = chat.user.name; // user text is data, never markup
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = chat.text;
  item.append(who, text);
  $("messages").append(item);
}

function alert(note) {
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.href = `/?ticket=${encodeURIComponent(note.data?.room ?? "")}`;
  link.textContent = `${note.title}: ${note.body}`;
  item.append(link);
  $("alerts").prepend(item);
}

function connect() {
  const socket = new WebSocket(endpoint, ["roomcast.v1"]);
  desk.socket = socket;
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    switch (message.type) {
      case "welcome":
        attempt = 0;
        status("online", true);
        if (room) {
          const join = { type: "join", room, ref: crypto.randomUUID() };
          if (position) join.since = position;
          else join.history = 50;
          socket.send(JSON.stringify(join));
        }
        break;
      case "chat":
        if (message.room === room) show(message);
        break;
      case "notification":
        if (message.room === null) alert(message);
        break;
      case "error":
        status(message.detail, false);
        break;
    }
  };
  socket.onclose = (event) => {
    if (event.code === 4401 || event.code === 4403) return; // logged out, or not allowed
    status("reconnecting…", false);
    setTimeout(connect, Math.random() * Math.min(10_000, 250 * 2 ** attempt++));
  };
}

if (room) {
  $("compose").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value;
    if (!text.trim() || desk.socket?.readyState !== WebSocket.OPEN) return;
    desk.socket.send(JSON.stringify({ type: "chat", room, text, ref: crypto.randomUUID() }));
    $("text").value = "";
  });
}
connect();
