// Opens the API's /docs (Swagger UI) and /redoc (ReDoc) in Debian's Chromium with every
// request to anything but 127.0.0.1 refused, as on a machine without internet, and counts
// the operations each page renders. Prints one JSON line: the operations each page shows
// and every request that was refused.
// Environment: PLAYWRIGHT_CORE (its index.mjs), CHROMIUM, API_URL.
import { pathToFileURL } from "node:url";

const env = process.env;
const { chromium } = await import(pathToFileURL(env.PLAYWRIGHT_CORE).href);
const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
    // No name but loopback resolves, whatever the page asks for.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
  ],
});
const refused = [];
try {
  const context = await browser.newContext({ serviceWorkers: "block" });
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.hostname === "127.0.0.1" || url.protocol === "data:" || url.protocol === "blob:") {
      return route.continue();
    }
    refused.push(url.href);
    return route.abort("internetdisconnected");
  });
  const page = await context.newPage({ viewport: { width: 1280, height: 900 } });

  await page.goto(`${env.API_URL}/docs`);
  await page.waitForSelector(".opblock-summary", { timeout: 30000 });
  const swagger = await page.$$eval(".opblock-summary", (ops) =>
    ops.map((op) => [
      op.querySelector(".opblock-summary-method")?.textContent,
      op.querySelector(".opblock-summary-path")?.getAttribute("data-path"),
    ].join(" ")));

  await page.goto(`${env.API_URL}/redoc`);
  await page.waitForSelector("[data-section-id^='operation/']", { timeout: 30000 });
  const redoc = await page.$$eval("[data-section-id^='operation/']", (ops) =>
    ops.map((op) => op.getAttribute("data-section-id")));

  console.log(JSON.stringify({ swagger, redoc, refused }));
} finally {
  await browser.close();
}
