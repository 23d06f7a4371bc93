// Drives Debian's Chromium through the whole web console as a person would (see
// test_console.py). Prints JSON lines, asks of the test, each answered by a line on stdin:
// {"ask": "restart-gateway"} when the desktop is open, {"ask": "pause-desktop" or
// "resume-desktop", "instance": id} to freeze or thaw the machine's VNC server; and at the
// end {"result": {"checks": {...}}}.
// Environment: PLAYWRIGHT_CORE, AXE, CHROMIUM, API_URL, VIEWPORT (WxH), EMAIL, PASSWORD,
// KEYS (three provider keys, comma-separated), ARTIFACTS (folder for screenshots),
// FOREIGN_WS (a WebSocket address other than the gateway's, which the page must not reach).
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const env = process.env;
const { chromium } = await import(pathToFileURL(env.PLAYWRIGHT_CORE).href);
const [width, height] = env.VIEWPORT.split("x").map(Number);
const phone = width < 600;
const keys = env.KEYS.split(",");
const axeSource = readFileSync(env.AXE, "utf8");
const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const checks = { overflow: {}, axe: {}, cspViolations: [] };
const T = { timeout: 30000 };

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
  ],
});
const context = await browser.newContext({
  viewport: { width, height }, hasTouch: phone, isMobile: phone, deviceScaleFactor: 1,
});
// A client address of this run's own (through the test's trusted proxy), so that the
// rate limits it runs into are its own.
await context.setExtraHTTPHeaders({ "X-Forwarded-For": env.CLIENT_ADDRESS });

function watch(page) {
  page.on("console", (message) => {
    if (message.type() === "error" && /Content.Security.Policy/i.test(message.text())) {
      checks.cspViolations.push(message.text());
    }
  });
}

const page = await context.newPage();
watch(page);
let navigations = 0;
let listRequests = 0;
page.on("framenavigated", (frame) => { if (frame === page.mainFrame()) navigations += 1; });
page.on("request", (request) => {
  const url = new URL(request.url());
  if (url.pathname === "/api/instances" && request.method() === "GET") listRequests += 1;
});

let shot = 0;
async function screen(name) {
  // Each main screen: a screenshot, no sideways scroll, and what axe finds.
  shot += 1;
  await page.screenshot({ path: `${env.ARTIFACTS}/${shot}-${name}.png` });
  const wide = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (wide > 0) checks.overflow[name] = wide;
  await page.evaluate(axeSource);
  const found = await page.evaluate(async () => {
    const { violations } = await window.axe.run(document, {
      runOnly: { type: "tag", values: ["wcag2a", "wcag2aa"] },
    });
    return violations.map((v) => `${v.id}: ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
  });
  if (found.length) checks.axe[name] = found;
}

// Share of the canvas's pixels near a colour; and how many distinct colours it shows.
async function canvasShare(rgb) {
  return page.evaluate(([r, g, b]) => {
    const canvas = document.querySelector("#screen canvas");
    if (!canvas || !canvas.width) return 0;
    const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    let near = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 40) near += 1;
    }
    return near / (data.length / 4);
  }, rgb);
}

async function waitShare(rgb, min = 0.3) {
  const deadline = Date.now() + 20000;
  let share = 0;
  while (Date.now() < deadline) {
    share = await canvasShare(rgb);
    if (share >= min) return share;
    await page.waitForTimeout(250);
  }
  return share;
}

async function screenSummary() {
  return page.evaluate(() => {
    const canvas = document.querySelector("#screen canvas");
    const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    const counts = new Map();
    for (let i = 0; i < data.length; i += 16) {
      const key = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    const sorted = [...counts.values()].sort((a, b) => b - a);
    const total = data.length / 16;
    return {
      background: sorted[0] / total, // the root window's colour fills most of the screen
      colours: [...counts.values()].filter((n) => n / total > 0.001).length,
    };
  });
}

// A point of the remote screen (framebuffer pixels) on the page.
async function at(x, y) {
  return page.evaluate(([x, y]) => {
    const canvas = document.querySelector("#screen canvas");
    const rect = canvas.getBoundingClientRect();
    return {
      x: rect.left + (x * rect.width) / canvas.width,
      y: rect.top + (y * rect.height) / canvas.height,
    };
  }, [x, y]);
}

// Ask the test for something and wait for its answer.
async function ask(message) {
  console.log(JSON.stringify(message));
  await stdin.next();
}

// The API as the page itself calls it (the same module, so the same access token).
async function callApi(method, path) {
  return page.evaluate(async ([method, path]) => {
    const { api } = await import(new URL("api.js", location.href).href);
    return api(method, path);
  }, [method, path]);
}

// Every state and health the machine's row shows, in order, without repeats.
const statesSeen = [];
const healthSeen = [];
await page.exposeFunction("machineRow", (state, health) => {
  if (statesSeen.at(-1) !== state) statesSeen.push(state);
  if (healthSeen.at(-1) !== health) healthSeen.push(health);
});
async function watchMachine() {
  await page.evaluate(() => {
    new MutationObserver(() => {
      const item = document.querySelector("li.machine");
      if (item) window.machineRow(item.dataset.state, item.querySelector("[data-role=health]").textContent);
    }).observe(document.querySelector(".machine-list"), { childList: true, subtree: true });
  });
}

async function typeToMachine(text) {
  // The pointer into the terminal first: without a window manager, keys go where it is.
  const point = await at(400, 300);
  await page.mouse.click(point.x, point.y);
  // On a phone, through the on-screen keyboard control: a field the phone's keyboard
  // types into.
  if (phone) await page.click("#keyboard");
  await page.keyboard.type(text, { delay: 20 });
  await page.keyboard.press("Enter");
}

try {
  // Sign up.
  const first = await page.goto(`${env.API_URL}/app/`);
  checks.csp = first.headers()["content-security-policy"];
  await page.waitForSelector("body[data-view=auth]", T);
  await screen("signin");
  // The keyboard alone: from the focused heading, Tab walks the form in order.
  const order = [];
  for (let i = 0; i < 3; i += 1) {
    await page.keyboard.press("Tab");
    order.push(await page.evaluate(() =>
      document.activeElement.id || document.activeElement.textContent.trim()));
  }
  checks.signinTabOrder = order;
  await page.click("#to-signup");
  await page.fill("#signup-email", env.EMAIL);
  await page.fill("#signup-password", env.PASSWORD);
  await page.click("#signup button[type=submit]");
  await page.waitForSelector("body[data-view=home][data-feed=live]", T);
  checks.storage = await page.evaluate(() => ({
    localStorage: localStorage.length, sessionStorage: sessionStorage.length,
  }));
  checks.documentCookie = await page.evaluate(() => document.cookie);

  // Keys: add two, replace one, remove the other; only hints are shown.
  await page.selectOption("#key-provider", "anthropic");
  await page.fill("#key-value", keys[0]);
  await page.click("#add-key button[type=submit]");
  await page.waitForSelector('li.key[data-provider="anthropic"]', T);
  const firstHint = await page.textContent('li.key[data-provider="anthropic"] [data-role=hint]');
  await page.selectOption("#key-provider", "openai");
  await page.fill("#key-value", keys[2]);
  await page.click("#add-key button[type=submit]");
  await page.waitForSelector('li.key[data-provider="openai"]', T);
  await page.click('li.key[data-provider="anthropic"] [data-action=replace]');
  await page.fill("#replace-anthropic", keys[1]);
  await page.click('li.key[data-provider="anthropic"] form.replace button[type=submit]');
  await page.waitForFunction((hint) => document.querySelector(
    'li.key[data-provider="anthropic"] [data-role=hint]')?.textContent !== hint, firstHint, T);
  const secondHint = await page.textContent('li.key[data-provider="anthropic"] [data-role=hint]');
  checks.keyHints = [firstHint, secondHint];
  await page.click('li.key[data-provider="openai"] [data-action=remove]');
  await page.waitForSelector("dialog#confirm[open]", T);
  await screen("confirm-remove-key");
  await page.click("#confirm-ok");
  await page.waitForSelector('li.key[data-provider="openai"]', { state: "detached", ...T });
  checks.keysAfterRemove = await page.$$eval("li.key", (items) => items.map((i) => i.dataset.provider));
  checks.keysText = await page.textContent("#keys");
  await screen("keys");

  // Create a machine of a size the picker offers (not the default), and watch it turn
  // running, live: every state and health its row shows.
  await watchMachine();
  await page.waitForSelector("#create-size option", { state: "attached", ...T });
  checks.sizeOptions = await page.$$eval("#create-size option", (options) =>
    options.map((option) => [option.value, option.textContent]));
  checks.sizeDefault = await page.inputValue("#create-size");
  checks.sizeChosen = checks.sizeOptions.map(([value]) => value)
    .find((value) => value !== checks.sizeDefault);
  await page.fill("#create-name", "my desk");
  await page.selectOption("#create-size", checks.sizeChosen);
  await page.click("#create button[type=submit]");
  await page.waitForSelector("li.machine", T);
  const id = await page.getAttribute("li.machine", "data-instance");
  const row = `li.machine[data-instance="${id}"]`;
  await page.waitForFunction((id) => {
    const item = document.querySelector(`li.machine[data-instance="${id}"]`);
    return item?.dataset.state === "running";
  }, id, { timeout: 90000, polling: 100 });
  checks.statesSeen = [...statesSeen];
  checks.rowName = await page.textContent(`${row} .machine-name`);
  checks.recordedSize = (await callApi("GET", `/api/instances/${id}`)).size;
  checks.navigations = navigations;
  checks.listRequests = listRequests;
  // One more is over the quota: said beside the form.
  await page.fill("#create-name", "one too many");
  await page.click("#create button[type=submit]");
  await page.waitForSelector("#create .error:not(:empty)", T);
  checks.quotaError = await page.textContent("#create .error");
  await page.fill("#create-name", "");
  await screen("machines");

  // The desktop, with the agent beside it.
  const openedAt = Date.now();
  await page.click(`button[data-action=open][data-instance="${id}"]`);
  await page.waitForSelector("body[data-desktop=connected]", T);
  await page.waitForFunction(() => {
    const canvas = document.querySelector("#screen canvas");
    if (!canvas?.width) return false;
    const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < data.length; i += 4 * 97) if (data[i] || data[i + 1] || data[i + 2]) return true;
    return false;
  }, null, T);
  await page.waitForTimeout(500);
  checks.screen = await screenSummary();
  await page.waitForSelector("body[data-agent=connected]", T);
  await screen("desktop");
  const box = await page.locator("#say-text").boundingBox();
  checks.agentInView = box !== null && box.y >= 0 && box.y + box.height <= height
    && box.x + box.width <= width;

  // Typed input runs in the machine's terminal: its background turns green.
  await typeToMachine("xsetroot -solid '#22aa44'");
  checks.typedCommandRan = await waitShare([0x22, 0xaa, 0x44]);

  // The clipboard: to the machine (a command sent, pasted into the terminal with the
  // middle button, run), then from it (the terminal's first line, selected).
  await page.click("#clipboard-toggle");
  await page.fill("#clipboard-text", "xsetroot -solid '#3366ff'");
  await page.click("#clipboard button[type=submit]");
  await page.waitForTimeout(1000);
  const term = await at(400, 300);
  await page.mouse.click(term.x, term.y, { button: "middle" });
  // The terminal asks the selection's owner for the text: let it arrive before Enter.
  await page.waitForTimeout(1500);
  if (phone) await page.click("#keyboard");
  await page.keyboard.press("Enter");
  checks.pastedCommandRan = await waitShare([0x33, 0x66, 0xff]);
  await page.fill("#clipboard-text", "");
  const line = await at(120, 48);
  await page.mouse.click(line.x, line.y, { clickCount: 3 });
  await page.waitForFunction(() =>
    document.querySelector("#clipboard-text").value.includes("CloudBot instance"), null, T)
    .catch(() => {});
  checks.clipboardFromMachine = await page.inputValue("#clipboard-text");
  await screen("desktop-clipboard");

  // View only: neither the pointer nor the keys reach the machine. In view only, a click
  // far off the terminal (keys go where the pointer is) and "echo " typed; then, view only
  // off, a command typed without a click: it runs only if neither got through.
  const inTerminal = await at(400, 300);
  await page.mouse.click(inTerminal.x, inTerminal.y);
  await page.click("#viewonly");
  checks.viewOnlyOn = await page.getAttribute("#viewonly", "aria-pressed");
  const offTerminal = await at(1200, 760);
  await page.mouse.click(offTerminal.x, offTerminal.y);
  if (phone) await page.click("#keyboard");
  else await page.focus("#screen canvas");
  await page.keyboard.type("echo ", { delay: 20 });
  await page.waitForTimeout(500);
  await page.click("#viewonly");
  checks.viewOnlyPressed = await page.getAttribute("#viewonly", "aria-pressed");
  if (phone) await page.click("#keyboard");
  else await page.focus("#screen canvas");
  await page.keyboard.type("xsetroot -solid '#aa2222'", { delay: 20 });
  await page.keyboard.press("Enter");
  checks.afterViewOnly = await waitShare([0xaa, 0x22, 0x22]);

  // Ctrl-Alt-Del reaches the machine as those keys together: the terminal's shell, told
  // what xterm sends for Delete with Control and Alt held (ESC [3;7~), turns the screen
  // orange.
  await typeToMachine(`bind -x '"\\e[3;7~": xsetroot -solid "#ff8800"'`);
  await page.waitForTimeout(300);
  await page.click("#cad");
  checks.ctrlAltDel = await waitShare([0xff, 0x88, 0x00]);

  // Full screen (the screen alone), scaling off and on again.
  await page.click("#fullscreen");
  checks.fullscreen = await page.waitForFunction(() => document.fullscreenElement?.id, null, T)
    .then((handle) => handle.jsonValue()).catch(() => null);
  await page.evaluate(() => document.exitFullscreen().catch(() => {}));
  await page.click("#scale");
  checks.unscaledWidth = await page.evaluate(() =>
    document.querySelector("#screen canvas").getBoundingClientRect().width);
  await page.click("#scale");

  // Talk to the agent.
  checks.said = `hello agent ${Date.now()}`;
  await page.fill("#say-text", checks.said);
  await page.click("#say button[type=submit]");
  await page.waitForSelector("#agent .messages li.agent", T);
  checks.agentSaid = await page.$$eval("#agent .messages li.agent p", (items) =>
    items.map((item) => item.textContent));
  // Who said what, and when.
  checks.transcript = await page.$$eval("#agent .messages li", (items) => items.map((item) => ({
    who: item.querySelector(".who").textContent,
    at: item.querySelector("time").dateTime,
    shown: item.querySelector("time").textContent,
    text: item.querySelector("p").textContent,
  })));
  checks.transcriptWindow = [openedAt, Date.now()];

  // Reload: still signed in, back on the desktop.
  await page.reload();
  await page.waitForSelector("body[data-desktop=connected]", T);
  await watchMachine();
  checks.afterReload = await page.getAttribute("body", "data-desktop");
  // A new tab: signed in too.
  const tab = await context.newPage();
  watch(tab);
  await tab.goto(`${env.API_URL}/app/`);
  await tab.waitForSelector("body[data-view=home]", T);
  checks.newTab = await tab.getAttribute("body", "data-view");
  await tab.close();

  // The gateway restarts under the open desktop: it reconnects with a fresh ticket.
  const seen = [];
  await page.exposeFunction("desktopState", (value) => seen.push(value));
  await page.evaluate(() => {
    new MutationObserver(() => window.desktopState(document.body.dataset.desktop))
      .observe(document.body, { attributes: true, attributeFilter: ["data-desktop"] });
  });
  console.log(JSON.stringify({ ask: "restart-gateway" }));
  await stdin.next();
  await page.waitForFunction(() => document.body.dataset.desktop === "connected"
    && document.querySelector("#screen canvas")?.width > 0, null, { timeout: 40000 });
  await page.waitForTimeout(200);
  checks.afterGatewayRestart = [...new Set(seen.filter((s) => s !== "connecting"))];
  // The agent came back too: what is said now is answered.
  await page.waitForSelector("body[data-agent=connected]", T);
  await page.fill("#say-text", `${checks.said} again`);
  await page.click("#say button[type=submit]");
  await page.waitForFunction(() =>
    document.querySelectorAll("#agent .messages li.agent").length >= 1
    && [...document.querySelectorAll("#agent .messages li.agent p")]
      .some((p) => p.textContent.endsWith(" again")), null, T);
  checks.agentAfterRestart = await page.$$eval("#agent .messages li.agent p", (items) =>
    items.map((item) => item.textContent));
  await screen("desktop-reconnected");

  // Back to the list: stop, start, delete (with confirmation), each seen live.
  await page.click("#desktop .toolbar a");
  await page.waitForSelector("body[data-view=home]", T);
  const lifecycle = [];
  const until = async (wanted) => {
    await page.waitForFunction(([id, wanted]) => {
      const item = document.querySelector(`li.machine[data-instance="${id}"]`);
      return wanted === "removed" ? !item : item?.dataset.state === wanted;
    }, [id, wanted], { timeout: 90000, polling: 100 });
    lifecycle.push(wanted);
  };
  // The machine's health as it reports it, shown as it changes (the page has been
  // watching it since the machine was created): up, down while its VNC server is frozen,
  // up again.
  const health = (desktop) => `${row} [data-role=health][data-desktop=${desktop}][data-agent=up]`;
  await page.waitForSelector(health("up"), { timeout: 60000 });
  await ask({ ask: "pause-desktop", instance: id });
  // The machine reports within its heartbeat interval (30 s) and a probe's timeout.
  await page.waitForSelector(health("down"), { timeout: 90000 });
  await ask({ ask: "resume-desktop", instance: id });
  await page.waitForSelector(health("up"), { timeout: 60000 });
  checks.healthSeen = [...healthSeen];
  checks.listRequestsAfterHealth = listRequests;
  // The person's stop races another client's: the person's arrives second, and the
  // API's 409 is said in the machine's row, with the state the machine is in.
  let held = null;
  await page.route("**/api/instances/*/stop", (route) => {
    if (held === null) held = route;
    else route.continue();
  });
  await page.click(`button[data-action=stop][data-instance="${id}"]`);
  for (let waited = 0; held === null; waited += 50) {
    if (waited > 30000) throw new Error("the person's stop never left the page");
    await page.waitForTimeout(50);
  }
  await callApi("POST", `/api/instances/${id}/stop`);
  await until("stopped");
  await held.continue();
  await page.waitForSelector(`${row} .error:not(:empty)`, T);
  checks.raceError = await page.textContent(`${row} .error`);
  await page.unroute("**/api/instances/*/stop");
  checks.healthStopped = await page.textContent(`${row} [data-role=health]`);
  await screen("stopped");
  await page.click(`button[data-action=start][data-instance="${id}"]`);
  await until("running");
  await page.click(`button[data-action=delete][data-instance="${id}"]`);
  await page.waitForSelector("dialog#confirm[open]", T);
  await page.click("#confirm-ok");
  await until("removed");
  checks.lifecycle = lifecycle;

  // Sign out everywhere: this tab, another open tab, and a reload all show the sign-in.
  const other = await context.newPage();
  watch(other);
  await other.goto(`${env.API_URL}/app/`);
  await other.waitForSelector("body[data-view=home][data-feed=live]", T);
  await page.click("#signout-all");
  await page.waitForSelector("body[data-view=auth]", T);
  await other.waitForSelector("body[data-view=auth]", T);
  checks.otherTabAfterSignOut = await other.getAttribute("body", "data-view");
  await other.close();
  await page.reload();
  await page.waitForSelector("body[data-view=auth]", T);
  checks.afterSignOutEverywhere = await page.getAttribute("body", "data-view");
  await screen("signed-out");

  // Signing in too often: the form says how long to wait.
  await page.fill("#signin-email", env.EMAIL);
  for (let i = 0; i < 15; i += 1) {
    await page.fill("#signin-password", "not the password");
    await page.click("#signin button[type=submit]");
    await page.waitForSelector("#signin .error:not(:empty)", T);
    checks.signinRefusal = await page.textContent("#signin .error");
    if (checks.signinRefusal.startsWith("Too many")) break;
    await page.evaluate(() => { document.querySelector("#signin .error").textContent = ""; });
  }
  await screen("rate-limited");

  // The policy keeps the page's connections to its own origin and the gateway: a
  // WebSocket anywhere else is refused by the browser.
  const probe = await context.newPage();
  await probe.goto(`${env.API_URL}/app/`);
  checks.foreignWebSocket = await probe.evaluate((url) => new Promise((resolve) => {
    document.addEventListener("securitypolicyviolation", (event) => resolve(
      { refused: event.effectiveDirective, address: event.blockedURI }), { once: true });
    try {
      const socket = new WebSocket(url);
      socket.addEventListener("open", () => resolve({ opened: url }));
    } catch (error) {
      resolve({ thrown: error.name });
    }
    setTimeout(() => resolve({ nothing: url }), 10000);
  }), env.FOREIGN_WS);
  await probe.close();
  console.log(JSON.stringify({ result: { checks } }));
} catch (error) {
  await page.screenshot({ path: `${env.ARTIFACTS}/failure.png` }).catch(() => {});
  console.error(error);
  console.error(JSON.stringify(checks));
  process.exitCode = 1;
} finally {
  await browser.close();
  process.stdin.destroy();
}
