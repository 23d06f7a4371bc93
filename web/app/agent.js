// The machine's agent beside its desktop: text both ways through the gateway, with a
// one-time ticket of its own; who said what, and when; reconnects by itself after a drop.
import { api } from "./api.js";
import { el, timeElement } from "./ui.js";

const MAX_PAUSE_SECONDS = 10;

export class Agent {
  constructor(root) {
    this.root = root;
    this.messages = root.querySelector(".messages");
    this.status = root.querySelector("#agent-status");
    this.reconnectButton = root.querySelector("#agent-reconnect");
    this.form = root.querySelector("#say");
    this.socket = null;
    this.machine = null;
    this.generation = 0;
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      const input = this.form.elements.message;
      if (this.socket?.readyState !== WebSocket.OPEN) {
        this.line("system", "Not connected: the message was not sent.");
        return;
      }
      this.socket.send(input.value);
      this.line("you", input.value);
      input.value = "";
    });
    this.reconnectButton.addEventListener("click", () => {
      if (this.machine) this.connect(++this.generation, 0);
    });
  }

  line(who, text) {
    const label = { you: "You", agent: "Agent", system: "CloudBot" }[who];
    this.messages.append(el("li", { className: who },
      el("span", { className: "who" }, label), " ", timeElement(new Date()),
      el("p", {}, text)));
    this.messages.scrollTop = this.messages.scrollHeight;
  }

  say(text, state) {
    this.status.textContent = text;
    document.body.dataset.agent = state;
    this.reconnectButton.hidden = state === "connected" || state === "connecting";
  }

  open(machine) {
    this.close();
    this.messages.replaceChildren();
    this.machine = machine;
    this.connect(++this.generation, 0);
  }

  close() {
    this.generation += 1;
    clearTimeout(this.timer);
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    this.machine = null;
  }

  async connect(generation, attempt) {
    clearTimeout(this.timer);
    this.socket?.close();
    this.say("connecting…", "connecting");
    let url;
    try {
      ({ url } = await api("POST", `/api/instances/${this.machine.id}/tickets`, {
        channel: "cloudbot",
      }));
    } catch (error) {
      if (generation !== this.generation) return;
      if (error.status === 409 || error.status === 404) {
        this.say(`not reachable: the machine is ${error.state || "gone"}`, "unavailable");
      } else this.retry(generation, attempt, error.message);
      return;
    }
    if (generation !== this.generation) return;
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.addEventListener("open", () => {
      attempt = 0;
      this.say("connected", "connected");
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      let text = event.data;
      try {
        const message = JSON.parse(text);
        if (message.type === "hello") {
          this.line("system", `${message.agent} ${message.version} is here.`);
          return;
        }
      } catch {
        // not JSON: shown as it is
      }
      this.line("agent", text);
    });
    socket.addEventListener("close", (event) => {
      if (generation !== this.generation || this.socket !== socket) return;
      this.socket = null;
      this.retry(generation, attempt, event.reason || "connection lost");
    });
  }

  retry(generation, attempt, why) {
    const pause = Math.min(2 ** attempt, MAX_PAUSE_SECONDS);
    this.say(`${why}; reconnecting in ${pause} s…`, "reconnecting");
    this.timer = setTimeout(() => {
      if (generation === this.generation) this.connect(generation, attempt + 1);
    }, pause * 1000);
  }

  /** The machine's state changed (from the machines stream). */
  update(machine) {
    if (!this.machine || machine?.id !== this.machine.id) return;
    this.machine = machine;
    if (machine.state === "running" && !this.socket && document.body.dataset.agent !== "connecting") {
      this.connect(this.generation, 0);
    }
  }
}
