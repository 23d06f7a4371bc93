// Drives Debian's Chromium through the desktop page as a person would: log in, wait
// IDLE_MS (long enough for the access token to expire), open the machine's desktop, wait
// for noVNC to connect and for the canvas to show the desktop, then say SAY to the
// machine's agent. Prints one JSON line: the share of red pixels on the canvas, the
// page's status line, how many times the page refreshed its tokens, and what the agent
// said.
// Environment: PLAYWRIGHT_CORE (its index.mjs), API_URL, EMAIL, PASSWORD, INSTANCE_ID,
// IDLE_MS, SAY.
import { pathToFileURL } from "node:url";

const env = process.env;
const { chromium } = await import(pathToFileURL(env.PLAYWRIGHT_CORE).href);
const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  let refreshes = 0;
  page.on("response", (response) => {
    const path = new URL(response.url()).pathname;
    if (path === "/api/auth/web/refresh" && response.ok()) refreshes += 1;
  });
  await page.goto(`${env.API_URL}/app/`);
  await page.fill("#signin-email", env.EMAIL);
  await page.fill("#signin-password", env.PASSWORD);
  await page.click("#signin button[type=submit]");
  const open = `button[data-action=open][data-instance="${env.INSTANCE_ID}"]`;
  await page.waitForSelector(open, { timeout: 15000 });
  await page.waitForTimeout(Number(env.IDLE_MS || 0));
  await page.click(open, { timeout: 15000 });
  await page.waitForSelector("body[data-desktop=connected]", { timeout: 20000 });
  // The framebuffer arrives after the connect event: wait until the canvas shows it.
  const red = await page.waitForFunction(() => {
    const canvas = document.querySelector("#screen canvas");
    if (!canvas || !canvas.width) return false;
    const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    let red = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] > 200 && data[i + 1] < 60 && data[i + 2] < 60) red += 1;
    }
    const share = red / (data.length / 4);
    return share > 0.5 ? share : false;
  }, null, { timeout: 20000 });
  // Talk to the machine's agent beside the desktop: what it answers shows in the list.
  await page.waitForSelector("body[data-agent=connected]", { timeout: 20000 });
  await page.fill("#say-text", env.SAY);
  await page.click("#say button[type=submit]");
  await page.waitForSelector("#agent .messages li.agent", { timeout: 20000 });
  const agentSaid = await page.$$eval("#agent .messages li.agent p", (items) =>
    items.map((item) => item.textContent));
  console.log(JSON.stringify({
    red: await red.jsonValue(),
    status: await page.textContent("#vnc-status"),
    refreshes,
    agentSaid,
  }));
} finally {
  await browser.close();
}
