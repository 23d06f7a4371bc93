// The CloudBot desktop page: log in, pick a running machine, watch and drive its desktop.
// The tokens live in this page's memory only; the desktop connection uses a single-use
// ticket from the API, so no long-lived credential is ever put in a URL. An expired
// access token is traded for a new pair with the refresh token, once, when the API
// answers 401.
import RFB from "./novnc/core/rfb.js";

const $ = (selector) => document.querySelector(selector);
let tokens = null; // { access_token, refresh_token } while logged in
let refreshing = null; // the refresh under way, shared by every request that needs it
let rfb = null;
let agent = null; // the WebSocket to the machine's agent, while the desktop is open

async function request(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {
      ...(body ? { "Content-Type": "application/json" } : {}),
      ...(tokens ? { Authorization: `Bearer ${tokens.access_token}` } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = response.status === 204 ? null : await response.json();
  return { response, data };
}

function refresh(used) {
  refreshing ??= request("POST", "/api/auth/refresh", { refresh_token: used.refresh_token })
    .then(({ response, data }) => {
      // A refresh token works once: a second try with it would end the login session.
      tokens = response.ok && tokens === used ? data : null;
      return tokens !== null;
    })
    .catch(() => false)
    .finally(() => {
      refreshing = null;
    });
  return refreshing;
}

async function api(method, path, body) {
  const used = tokens;
  let { response, data } = await request(method, path, body);
  if (response.status === 401 && used && !path.startsWith("/api/auth/")) {
    if (!(await refresh(used))) {
      loggedOut("Your session has ended: log in again.");
      throw new Error("Your session has ended: log in again.");
    }
    ({ response, data } = await request(method, path, body));
  }
  if (!response.ok) {
    // Every error is a problem document (RFC 9457): say its detail, or its title.
    throw new Error(data?.detail || data?.title || `HTTP ${response.status}`);
  }
  return data;
}

function show(id) {
  for (const section of ["#login", "#instances", "#desktop"]) {
    $(section).hidden = section !== id;
  }
  $("#logout").hidden = id === "#login";
}

async function listInstances() {
  show("#instances");
  const list = $("#instances ul");
  list.replaceChildren();
  const { items } = await api("GET", "/api/instances");
  if (!items.length) {
    list.append(Object.assign(document.createElement("li"), { textContent: "No machines yet." }));
  }
  for (const instance of items) {
    const item = document.createElement("li");
    item.textContent = `${instance.name} (${instance.state}) `;
    if (instance.state === "running") {
      const open = Object.assign(document.createElement("button"), {
        textContent: "Open desktop",
      });
      open.dataset.instance = instance.id;
      open.addEventListener("click", () => openDesktop(instance).catch(fail("#instances")));
      item.append(open);
    }
    list.append(item);
  }
}

async function openDesktop(instance) {
  const { url } = await api("POST", `/api/instances/${instance.id}/tickets`, { channel: "vnc" });
  show("#desktop");
  const status = $("#desktop .status");
  status.textContent = `Connecting to ${instance.name}...`;
  rfb = new RFB($("#screen"), url, { wsProtocols: ["binary"] });
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => {
    status.textContent = `${instance.name}: connected`;
    document.body.dataset.desktop = "connected";
  });
  rfb.addEventListener("disconnect", (event) => {
    status.textContent = `${instance.name}: ${event.detail.clean ? "closed" : "connection lost"}`;
    document.body.dataset.desktop = "closed";
  });
  openAgent(instance).catch((error) => {
    $("#agent .status").textContent = error.message;
  });
}

function say(text, mine) {
  const line = Object.assign(document.createElement("li"), { textContent: text });
  if (mine) line.className = "mine";
  const messages = $("#agent .messages");
  messages.append(line);
  messages.scrollTop = messages.scrollHeight;
}

// The agent channel: text frames both ways, through the gateway with its own ticket.
async function openAgent(instance) {
  $("#agent .messages").replaceChildren();
  const status = $("#agent .status");
  status.textContent = "connecting...";
  const { url } = await api("POST", `/api/instances/${instance.id}/tickets`, {
    channel: "cloudbot",
  });
  if (!rfb) return; // the desktop was closed meanwhile
  const socket = new WebSocket(url);
  agent = socket;
  socket.addEventListener("open", () => {
    status.textContent = "connected";
    document.body.dataset.agent = "connected";
  });
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") return;
    let text = event.data;
    try {
      const message = JSON.parse(text);
      if (message.type === "hello") text = `${message.agent} ${message.version} is here.`;
    } catch {
      // not JSON: shown as it is
    }
    say(text, false);
  });
  socket.addEventListener("close", (event) => {
    if (agent === socket) {
      status.textContent = event.reason || "closed";
      document.body.dataset.agent = "closed";
    }
  });
}

function closeDesktop() {
  if (rfb) {
    rfb.disconnect();
    rfb = null;
  }
  if (agent) {
    const socket = agent;
    agent = null;
    socket.close();
  }
}

$("#agent").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = event.target.elements.message;
  if (agent?.readyState !== WebSocket.OPEN) return;
  agent.send(input.value);
  say(input.value, true);
  input.value = "";
});

function fail(section) {
  return (error) => {
    $(`${section} .error`).textContent = error.message;
  };
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    tokens = await api("POST", "/api/auth/login", {
      email: form.get("email"),
      password: form.get("password"),
    });
    event.target.reset();
    $("#login .error").textContent = "";
    $("#who").textContent = (await api("GET", "/api/auth/me")).email;
    await listInstances();
  } catch (error) {
    fail("#login")(error);
  }
});

$("#back").addEventListener("click", () => {
  closeDesktop();
  listInstances().catch(fail("#instances"));
});

function loggedOut(message) {
  closeDesktop();
  tokens = null;
  $("#who").textContent = "";
  $("#login .error").textContent = message;
  show("#login");
}

$("#logout").addEventListener("click", async () => {
  await api("POST", "/api/auth/logout").catch(() => {});
  loggedOut("");
});
