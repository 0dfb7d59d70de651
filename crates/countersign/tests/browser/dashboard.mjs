// Drives the dashboard in Debian's chromium (playwright-core, headless) against a real server that
// tests/it/dashboard.rs started. Usage:
//   node dashboard.mjs <url> <admin key> <viewer key> <agent key> <screenshot dir>
// Exits non-zero with a message on the first expectation that fails; saves screenshots as it goes.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, adminKey, viewerKey, agentKey, shots] = process.argv.slice(2);
if (!shots) {
  console.error("usage: node dashboard.mjs <url> <admin key> <viewer key> <agent key> <screenshot dir>");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

function expect(condition, message) {
  if (!condition) throw new Error(`expectation failed: ${message}`);
}

const REASONING = '{"goal":"refund order 1042","why":"customer <b>charged twice</b> & asked","alternatives":["store credit"]}';

async function submit(capability, amount) {
  const response = await fetch(`${url}/v1/actions`, {
    method: "POST",
    headers: { "authorization": `Bearer ${agentKey}`, "content-type": "application/json" },
    body: JSON.stringify({
      capability,
      params: { amount_cents: amount, currency: "eur", customer: { id: "cus_42", email: "a.very.long.address.that.should.wrap@example.com" }, items: [{ sku: "A-1", qty: 2 }] },
      reasoning: JSON.parse(REASONING),
    }),
  });
  const body = await response.json();
  expect(response.status === 202, `submit answered ${response.status}: ${JSON.stringify(body)}`);
  return body.approval.id;
}

async function login(context, key) {
  const page = await context.newPage();
  await page.goto(`${url}/ui/`);
  expect(page.url().endsWith("/ui/login"), `not sent to the login page: ${page.url()}`);
  await page.fill("#key", key);
  await page.keyboard.press("Enter");
  await page.waitForURL("**/ui/pending");
  return page;
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  // The approver (admin) logs in and watches the queue.
  const admin = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await login(admin, adminKey);
  await page.screenshot({ path: join(shots, "01-pending-empty.png"), fullPage: true });
  await page.waitForSelector("#live.on", { timeout: 5000 });

  // A request submitted over the API appears without a reload. Measured over several submissions, one at a
  // time: from the API's answer to the row being in the page (Playwright waits on the DOM; no sleeps).
  const ROUNDS = 10;
  const appearMs = [];
  let approvalId = null;
  for (let i = 0; i < ROUNDS; i++) {
    const id = await submit("payments.charge.card", 4200 + i);
    const answered = performance.now();
    await page.waitForSelector(`tr[data-approval="${id}"]`, { timeout: 5000 });
    appearMs.push(performance.now() - answered);
    if (approvalId === null) approvalId = id;
  }
  const sorted = [...appearMs].sort((a, b) => a - b);
  const median = (sorted[(ROUNDS - 1) >> 1] + sorted[ROUNDS >> 1]) / 2;
  const max = sorted[ROUNDS - 1];
  console.log(`appear latency over ${ROUNDS} submissions (API answer to row visible, no reload): ` +
    `median ${median.toFixed(1)} ms, max ${max.toFixed(1)} ms, all ${appearMs.map((ms) => ms.toFixed(0)).join(" ")}`);
  // The target is a second; the test allows five so a slow machine does not fail it (the figures above are
  // the measurement).
  expect(max < 5000, `a new approval took ${max.toFixed(0)} ms to appear`);
  const row = `tr[data-approval="${approvalId}"]`;
  expect((await page.textContent(row)).includes("hold-charges"), "the row names the rule that fired");
  await page.screenshot({ path: join(shots, "02-pending-live.png"), fullPage: true });

  // Open the drawer from the keyboard: reasoning verbatim, snapshot, risk.
  await page.focus(`${row} a.open`);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#drawer:not([hidden]) #reasoning");
  expect((await page.textContent("#reasoning")).trim() === REASONING, "reasoning is shown verbatim");
  expect((await page.locator("#drawer b").count()) === 0, "reasoning markup is escaped, not rendered");
  expect((await page.textContent("#snapshot")).includes("hold-charges"), "the policy snapshot shows the rule");
  expect((await page.textContent("#risk-score")).trim().length > 0, "the risk score is shown");
  expect((await page.textContent("#drawer .fields")).includes("customer.email"), "nested params are labelled fields");
  await page.screenshot({ path: join(shots, "03-drawer.png"), fullPage: true });
  await page.keyboard.press("Escape");
  expect(await page.locator("#drawer").isHidden(), "Escape closes the drawer");
  await page.click(`${row} a.open`);
  await page.waitForSelector("#drawer:not([hidden]) #note-approve");

  // Approve with a note: it leaves Pending and enters History with the note.
  const note = "Checked the duplicate charge in the ledger";
  await page.fill("#note-approve", note);
  await page.click("#drawer form.approve button[type=submit]");
  await page.waitForURL("**/ui/pending");
  expect((await page.locator(row).count()) === 0, "the approved item left Pending");
  await page.click("nav >> text=History");
  await page.waitForURL("**/ui/history");
  const historyRow = await page.textContent(`#history ${row}`);
  expect(historyRow.includes("approved") && historyRow.includes(note), `history shows the decision and note: ${historyRow}`);
  await page.screenshot({ path: join(shots, "04-history.png"), fullPage: true });

  // A POST without the CSRF token is refused, though the session cookie goes along.
  const second = await submit("payments.charge.card", 999);
  const forged = await page.request.post(`${url}/ui/approvals/${second}/decide`, { form: { decision: "approve", note: "forged" } });
  expect(forged.status() === 403, `a CSRF-less POST answered ${forged.status()}`);
  const problem = await forged.json();
  expect(problem.code === "forbidden", `the refusal is a problem document: ${JSON.stringify(problem)}`);

  // A viewer sees the buttons disabled and why, at phone width.
  const viewer = await browser.newContext({ viewport: { width: 390, height: 844 } });
  const viewerPage = await login(viewer, viewerKey);
  await viewerPage.waitForSelector(`tr[data-approval="${second}"]`);
  await viewerPage.screenshot({ path: join(shots, "05-viewer-phone-pending.png"), fullPage: true });
  await viewerPage.click(`tr[data-approval="${second}"] a.open`);
  await viewerPage.waitForSelector("#drawer:not([hidden]) #blocked-reason");
  expect(await viewerPage.isDisabled("#drawer form.approve button[type=submit]"), "Approve is disabled for a viewer");
  expect(await viewerPage.isDisabled("#drawer form.deny button[type=submit]"), "Deny is disabled for a viewer");
  expect((await viewerPage.textContent("#blocked-reason")).includes("viewers cannot decide"), "the reason is shown");
  const width = await viewerPage.evaluate(() => document.documentElement.scrollWidth);
  expect(width <= 390, `nothing overflows a phone-width page (scroll width ${width})`);
  await viewerPage.screenshot({ path: join(shots, "06-viewer-phone-drawer.png"), fullPage: true });

  // The audit page shows the chain status and the decision.
  await page.goto(`${url}/ui/audit?action=approval.*`);
  expect((await page.textContent("#chain")).includes("intact"), "the audit chain is verified");
  expect((await page.textContent("#audit-rows")).includes("approval.approved"), "the audit page lists the decision");
  await page.screenshot({ path: join(shots, "07-audit.png"), fullPage: true });

  // At phone width the audit page opens on the newest events, fits the screen, and its UTC time filter
  // works from the keyboard; bad input is explained on the page.
  await viewerPage.goto(`${url}/ui/audit`);
  const seqs = await viewerPage.$$eval("#audit-rows tr[data-seq]", (rows) => rows.map((r) => Number(r.dataset.seq)));
  expect(seqs.length > 1 && seqs.every((seq, i) => i === 0 || seqs[i - 1] > seq), `newest first: ${seqs.join(",")}`);
  const auditWidth = await viewerPage.evaluate(() => document.documentElement.scrollWidth);
  expect(auditWidth <= 390, `the audit page fits a phone (scroll width ${auditWidth})`);
  await viewerPage.screenshot({ path: join(shots, "07-audit-phone.png") });
  await viewerPage.fill("#f-since", "2999-01-01T00:00:00");
  await viewerPage.focus("#f-action");
  await viewerPage.keyboard.press("Enter");
  await viewerPage.waitForURL(/since=2999-01-01T00%3A00/);
  expect(await viewerPage.isVisible("#audit-empty"), "a time range with no events says so");
  await viewerPage.goto(`${url}/ui/audit?since=last+tuesday`);
  expect((await viewerPage.textContent("#audit-error")).includes("is not a time"), "bad input is explained inline");
  await viewerPage.screenshot({ path: join(shots, "07-audit-bad-time.png"), fullPage: true });

  // The operator's pages are one click away in the nav; the policy page dry-runs an action.
  for (const [name, path] of [["Jobs", "jobs"], ["Sessions", "sessions"], ["Webhooks", "webhooks"], ["Policy", "policy"]]) {
    await page.click(`nav >> text=${name}`);
    await page.waitForURL(`**/ui/${path}`);
    expect((await page.getAttribute(`nav a[href="/ui/${path}"]`, "aria-current")) === "page", `${name} is the current tab`);
    await page.screenshot({ path: join(shots, `08-${path}.png`), fullPage: true });
  }
  await page.fill("#d-agent", "refund-bot");
  await page.fill("#d-capability", "payments.charge.card");
  await page.fill("#d-params", '{"amount_cents": 4200}');
  await page.click("#dry-run button[type=submit]");
  await page.waitForSelector("#verdict-effect");
  expect((await page.textContent("#verdict-effect")).trim() === "require_approval", "the dry run shows the verdict");
  await page.screenshot({ path: join(shots, "09-policy-dry-run.png"), fullPage: true });

  // Logging out ends the session.
  await page.click("text=Log out");
  await page.waitForURL("**/ui/login");
  await page.goto(`${url}/ui/pending`);
  expect(page.url().endsWith("/ui/login"), "after logout the dashboard asks to log in again");
  console.log("dashboard browser test passed");
} finally {
  await browser.close();
}
