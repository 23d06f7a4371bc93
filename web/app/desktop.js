// A machine's desktop: noVNC through the gateway with a one-time ticket, reconnecting with a
// fresh ticket after a drop (a network blip, a gateway restart) until the person leaves
// or the machine is no longer running.
import RFB from "./novnc/core/rfb.js";
import keysyms from "./novnc/core/input/keysymdef.js";
import { api } from "./api.js";

const BACKSPACE = 0xff08;
const RETURN = 0xff0d;
const MAX_PAUSE_SECONDS = 10;

export class Desktop {
  constructor(root) {
    this.root = root;
    this.screen = root.querySelector("#screen");
    this.status = root.querySelector("#vnc-status");
    this.rfb = null;
    this.machine = null;
    this.generation = 0; // bumps on each open and close, so stale callbacks do nothing
    this.scale = true;
    this.viewOnly = false;
    this.wire();
  }

  wire() {
    const $ = (selector) => this.root.querySelector(selector);
    $("#scale").addEventListener("click", (event) => {
      this.scale = !this.scale;
      event.currentTarget.setAttribute("aria-pressed", String(this.scale));
      this.applySettings();
    });
    $("#viewonly").addEventListener("click", (event) => {
      this.viewOnly = !this.viewOnly;
      event.currentTarget.setAttribute("aria-pressed", String(this.viewOnly));
      this.applySettings();
    });
    $("#fullscreen").addEventListener("click", () => {
      if (document.fullscreenElement) document.exitFullscreen();
      else $("#screen-area").requestFullscreen().catch(() => {});
    });
    $("#cad").addEventListener("click", () => this.rfb?.sendCtrlAltDel());

    // The clipboard: what the machine copies shows here; what is typed here is sent.
    const clipboard = $("#clipboard");
    $("#clipboard-toggle").addEventListener("click", (event) => {
      clipboard.hidden = !clipboard.hidden;
      event.currentTarget.setAttribute("aria-expanded", String(!clipboard.hidden));
      if (!clipboard.hidden) clipboard.elements.text.focus();
    });
    clipboard.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!this.rfb) return;
      this.rfb.clipboardPasteFrom(clipboard.elements.text.value);
      $("#clipboard-note").textContent = "Sent to the machine.";
    });

    // The on-screen keyboard: a text field that phones open their keyboard for; what is
    // typed into it is sent as keys.
    const keys = $("#keys-input");
    $("#keyboard").addEventListener("click", () => {
      keys.value = "";
      keys.focus();
    });
    keys.addEventListener("input", (event) => {
      if (event.inputType === "deleteContentBackward") this.key(BACKSPACE);
      for (const char of event.data ?? "") this.key(keysyms.lookup(char.codePointAt(0)));
      keys.value = "";
    });
    keys.addEventListener("keydown", (event) => {
      if (event.key === "Enter") this.key(RETURN);
      else if (event.key === "Backspace" && !keys.value) this.key(BACKSPACE);
      else return;
      event.preventDefault();
    });
  }

  key(keysym) {
    if (this.rfb && !this.viewOnly) this.rfb.sendKey(keysym);
  }

  applySettings() {
    if (!this.rfb) return;
    // Unscaled, the screen keeps its own size and scrolls inside its frame.
    this.rfb.scaleViewport = this.scale;
    this.rfb.viewOnly = this.viewOnly;
    this.screen.classList.toggle("unscaled", !this.scale);
  }

  say(text, state) {
    this.status.textContent = text;
    document.body.dataset.desktop = state;
  }

  open(machine) {
    this.close();
    this.machine = machine;
    this.connect(++this.generation, 0);
  }

  close() {
    this.generation += 1;
    clearTimeout(this.timer);
    if (this.rfb) {
      const rfb = this.rfb;
      this.rfb = null;
      rfb.disconnect();
    }
    this.machine = null;
    this.screen.replaceChildren();
  }

  async connect(generation, attempt) {
    const name = this.machine.name;
    this.say(attempt ? `Reconnecting to ${name}…` : `Connecting to ${name}…`, "connecting");
    let url;
    try {
      ({ url } = await api("POST", `/api/instances/${this.machine.id}/tickets`, { channel: "vnc" }));
    } catch (error) {
      if (generation !== this.generation) return;
      if (error.status === 409 || error.status === 404) {
        this.say(`${name} is ${error.state || "gone"}: the desktop is closed.`, "unavailable");
        return;
      }
      this.retry(generation, attempt, error.message);
      return;
    }
    if (generation !== this.generation) return;
    const rfb = new RFB(this.screen, url, { wsProtocols: ["binary"] });
    this.rfb = rfb;
    this.applySettings();
    rfb.focusOnClick = true;
    rfb.addEventListener("connect", () => {
      attempt = 0;
      this.say(`${name}: connected`, "connected");
      rfb.focus();
    });
    rfb.addEventListener("clipboard", (event) => {
      const box = this.root.querySelector("#clipboard-text");
      box.value = event.detail.text;
      this.root.querySelector("#clipboard-note").textContent = "Copied on the machine.";
    });
    rfb.addEventListener("disconnect", () => {
      if (generation !== this.generation || this.rfb !== rfb) return; // closed by the person
      this.rfb = null;
      this.retry(generation, attempt, "connection lost");
    });
  }

  retry(generation, attempt, why) {
    const pause = Math.min(2 ** attempt, MAX_PAUSE_SECONDS);
    this.say(`${this.machine.name}: ${why}; reconnecting in ${pause} s…`, "reconnecting");
    this.timer = setTimeout(() => {
      if (generation === this.generation) this.connect(generation, attempt + 1);
    }, pause * 1000);
  }

  /** The machine's state changed (from the machines stream). */
  update(machine) {
    if (!this.machine || machine?.id !== this.machine.id) return;
    this.machine = machine;
    const waiting = ["unavailable", "reconnecting"].includes(document.body.dataset.desktop);
    if (machine.state === "running" && waiting && !this.rfb) {
      clearTimeout(this.timer);
      this.connect(this.generation, 0);
    }
  }
}
