// The browser half of tests/web_ui.rs: Debian's chromium, headless, driven by
// playwright-core through the web UI as a person would use it. Run inside the
// test's network namespace (the daemon's loopback), it prints one line
// `RESULT {json}` of what it saw; the Rust test asserts on it and on the
// daemon's state. Every step names itself, so a failure says where it was.
//
// Environment: LOGIN_URL (what `banger web --json` printed), SHOTS (directory
// for the screenshots), VM (the name to create), WORKSPACE (a git checkout to
// put in it), HOST_PORT / GUEST_PORT (the forward to add), EVIL_PORT (a port
// for the foreign origin's page).
'use strict';
const { chromium } = require('playwright-core');
const http = require('http');
const path = require('path');

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const LOGIN_URL = env('LOGIN_URL');
const SHOTS = env('SHOTS');
const VM = env('VM');
const HOST_PORT = Number(env('HOST_PORT'));
const GUEST_PORT = Number(env('GUEST_PORT'));
const EVIL_PORT = Number(env('EVIL_PORT'));
const BASE = new URL(LOGIN_URL).origin;
const PORT = new URL(LOGIN_URL).port;

const result = { steps: [] };
let current = 'start';
const t0 = Date.now();
async function step(name, fn) {
  current = name;
  const t = Date.now();
  await fn();
  result.steps.push({ name, ms: Date.now() - t });
  console.error(`--- browser: ${name} ok in ${Date.now() - t} ms`);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

/** The text of the xterm.js screen (its DOM renderer's rows). */
async function terminalText(page) {
  return page.$eval('#terminal .xterm-rows', (n) => n.innerText).catch(() => '');
}

async function typeInTerminal(page, line) {
  await page.click('#terminal .xterm');
  await page.keyboard.type(line);
  await page.keyboard.press('Enter');
}

async function waitTerminal(page, pattern, timeout = 60000) {
  const deadline = Date.now() + timeout;
  let text = '';
  while (Date.now() < deadline) {
    text = await terminalText(page);
    const m = pattern.exec(text);
    if (m) return m;
    await page.waitForTimeout(200);
  }
  throw new Error(`the terminal never showed ${pattern}; it shows:\n${text}`);
}

/** A page on another origin (another port of this loopback) that tries to drive the API. */
function evilServer() {
  const html = `<!doctype html><title>evil</title><script>
    window.report = {};
    fetch('${BASE}/api/vms', { method: 'POST', mode: 'no-cors', credentials: 'include',
      headers: { 'Content-Type': 'text/plain' }, body: JSON.stringify({ name: 'evil' }) })
      .then(() => window.report.post = 'sent').catch((e) => window.report.post = 'error ' + e);
    const ws = new WebSocket('ws://127.0.0.1:${PORT}/api/vms/${VM}/terminal');
    ws.onopen = () => { window.report.ws = 'open'; ws.send(new TextEncoder().encode('touch /tmp/pwned\\n')); };
    ws.onclose = (e) => { window.report.ws = window.report.ws || ('closed ' + e.code); };
  </script>`;
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html' });
    res.end(html);
  });
  return new Promise((resolve) => server.listen(EVIL_PORT, '127.0.0.1', () => resolve(server)));
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    // Root in a test namespace: no user namespace sandbox. `rebind.test`
    // stands for an attacker's name that resolves to the loopback (DNS rebinding).
    args: ['--no-sandbox', '--host-resolver-rules=MAP rebind.test 127.0.0.1'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('dialog', (d) => d.accept());
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  let dashboard;
  try {
    await step('no cookie: the UI is refused', async () => {
      const r = await page.goto(`${BASE}/`);
      result.no_cookie_status = r.status();
    });

    await step('log in through the URL banger web printed', async () => {
      const r = await page.goto(LOGIN_URL);
      result.login_landed = new URL(page.url()).pathname;
      result.login_status = r.status();
      const cookies = await context.cookies(BASE);
      const c = cookies.find((c) => c.name === 'banger_session');
      result.cookie = c ? { httpOnly: c.httpOnly, sameSite: c.sameSite } : null;
      await page.waitForSelector('main h1:text("VMs")');
      await shot(page, '01-dashboard-empty');
    });

    await step('the login URL works once', async () => {
      const other = await browser.newContext();
      const p = await other.newPage();
      const r = await p.goto(LOGIN_URL);
      result.reused_login_status = r.status();
      await other.close();
    });

    // A second tab keeps the dashboard open through everything below: it must
    // follow every change without a reload.
    dashboard = await context.newPage();
    await dashboard.goto(`${BASE}/`);
    await dashboard.waitForSelector('#conn.live');
    await dashboard.evaluate(() => { window.neverReloaded = true; });

    await step('create a VM from the form, its stages appearing live', async () => {
      await page.click('nav a[data-nav="new"]');
      await page.waitForSelector('#create-form');
      await page.fill('#f-name', VM);
      await page.fill('#f-workspace', env('WORKSPACE'));
      await page.click('#create-form button[type="submit"]');
      // Stages seen while the create was still running.
      const seenRunning = new Set();
      const deadline = Date.now() + 240000;
      while (Date.now() < deadline) {
        const state = await page.evaluate(() => ({
          end: document.querySelector('#create-progress')?.getAttribute('data-op-end'),
          stages: [...document.querySelectorAll('#create-progress > ol [data-stage]')].map((n) => [n.getAttribute('data-stage'), n.getAttribute('data-status')]),
        }));
        if (!state.end) for (const [s] of state.stages) seenRunning.add(s);
        if (state.end) {
          result.create_end = state.end;
          result.create_stages = state.stages;
          break;
        }
        await page.waitForTimeout(100);
      }
      result.stages_seen_before_end = [...seenRunning];
      result.create_op = await page.getAttribute('#create-progress > ol[data-op]', 'data-op');
      // The workspace goes in once the VM runs.
      await page.waitForSelector('#workspace-progress[data-op-end]', { timeout: 120000 });
      result.workspace_end = await page.getAttribute('#workspace-progress', 'data-op-end');
      result.workspace_dest = await page.getAttribute('[data-workspace]', 'data-workspace').catch(() => null);
      if (result.create_end !== 'ok') {
        result.create_error = await page.textContent('#create-progress').catch(() => null);
        throw new Error(`the create did not end ok: ${result.create_error}`);
      }
      await shot(page, '02-create');
    });

    await step('the dashboard (never reloaded) shows it running', async () => {
      await dashboard.waitForSelector(`tr[data-vm="${VM}"][data-state="running"]`, { timeout: 30000 });
      // CPU and memory from the guest's agent.
      await dashboard.waitForFunction((vm) => {
        const t = document.querySelector(`tr[data-vm="${vm}"] [data-field="memory"]`)?.textContent || '';
        return t.includes('/');
      }, VM, { timeout: 30000 });
      result.dashboard_row = await dashboard.$eval(`tr[data-vm="${VM}"]`, (n) => n.innerText);
      await shot(dashboard, '03-dashboard-running');
    });

    await step('the terminal answers uname -a', async () => {
      await page.click(`a:has([data-created="${VM}"])`);
      await page.waitForSelector('#vm-state[data-state="running"]');
      await page.click('#open-terminal');
      await page.waitForSelector('#terminal[data-connected]');
      await typeInTerminal(page, 'uname -a');
      const m = await waitTerminal(page, /Linux \S+ \S+.*GNU\/Linux/);
      result.uname = m[0];
      await typeInTerminal(page, `cat ${result.workspace_dest}/hello.txt`);
      result.workspace_file = (await waitTerminal(page, /^(hello-from-the-host)$/m))[1];
      // xterm.js themes its rows through <style> elements it makes: the
      // page's CSP must let them apply, or the text is drawn unstyled.
      result.terminal_colors = await page.$eval('#terminal .xterm-rows', (n) => {
        const bg = getComputedStyle(n.closest('.xterm-viewport') || n.closest('.xterm')).backgroundColor;
        return { fg: getComputedStyle(n).color, bg };
      });
    });

    await step('guest text is shown as text (console)', async () => {
      // Markup written by the guest to its console must appear literally.
      await typeInTerminal(page, `echo '<img src=x id=pwned onerror=document.title=1>banger-markup' > /dev/console`);
      await page.waitForFunction(() => (document.querySelector('#console')?.textContent || '').includes('banger-markup'), null, { timeout: 30000 });
      result.console_has_literal_markup = await page.$eval('#console', (n) => n.textContent.includes('<img src=x id=pwned'));
      result.console_img_elements = await page.$$eval('#console img, #pwned', (n) => n.length);
    });

    await step('a forward added in the page serves what the guest serves', async () => {
      await typeInTerminal(page, `mkdir -p /tmp/www && echo banger-web-ok > /tmp/www/index.html && busybox httpd -p ${GUEST_PORT} -h /tmp/www && echo httpd-started`);
      await waitTerminal(page, /^httpd-started/m);
      await page.fill('#fwd-host', String(HOST_PORT));
      await page.fill('#fwd-guest', String(GUEST_PORT));
      await page.click('#forward-form button[type="submit"]');
      await page.waitForSelector(`[data-forward="${HOST_PORT}"]`);
      // The listening ports list links to the forward.
      await page.waitForSelector(`[data-forward-link="${HOST_PORT}"]`, { timeout: 20000 });
      const href = await page.getAttribute(`[data-forward-link="${HOST_PORT}"]`, 'href');
      const guestPage = await context.newPage();
      const r = await guestPage.goto(href);
      result.forward_status = r.status();
      result.forward_body = (await guestPage.textContent('body')).trim();
      await guestPage.close();
      await page.waitForFunction(() => /\d+%/.test(document.querySelector('[data-now="cpu"]')?.textContent || ''), null, { timeout: 20000 });
      await shot(page, '04-vm');
    });

    await step('a page of another origin cannot drive the API (Origin checks)', async () => {
      const server = await evilServer();
      const evil = await context.newPage();
      await evil.goto(`http://127.0.0.1:${EVIL_PORT}/`);
      await evil.waitForFunction(() => window.report && window.report.post && window.report.ws, null, { timeout: 15000 });
      result.evil = await evil.evaluate(() => window.report);
      await evil.close();
      server.close();
      // The terminal WebSocket was refused: no file appeared in the guest.
      await typeInTerminal(page, 'test -e /tmp/pwned && echo PWNED-YES || echo PWNED-NO');
      result.evil_ws_wrote = (await waitTerminal(page, /^PWNED-(YES|NO)$/m))[1] === 'YES';
    });

    await step('a rebound name (Host) is refused', async () => {
      const p = await context.newPage();
      const nav = await p.goto(`http://rebind.test:${PORT}/`);
      result.rebind_page_status = nav.status();
      await p.close();
    });

    await step('images, doctor and operation pages', async () => {
      await page.click('nav a[data-nav="images"]');
      await page.waitForSelector('[data-image]');
      result.images = await page.$$eval('[data-image]', (n) => n.map((x) => x.getAttribute('data-image')));
      await shot(page, '05-images');
      await page.click('nav a[data-nav="doctor"]');
      await page.waitForSelector('[data-check]');
      result.doctor_checks = await page.$$eval('[data-check]', (n) => n.length);
      await shot(page, '06-doctor');
      await page.goto(`${BASE}/ops/${result.create_op}`);
      await page.waitForSelector('#op[data-op-end]');
      result.op_page_stages = await page.$$eval('#op [data-stage]', (n) => n.map((x) => x.getAttribute('data-stage')));
      await shot(page, '07-operation');
    });

    await step('stop and delete from the VM page; the dashboard follows', async () => {
      await page.goto(`${BASE}/vms/${VM}`);
      await page.waitForSelector('#vm-state[data-state="running"]');
      await page.click('button[data-action="stop"]');
      await page.waitForSelector('#vm-activity[data-op-end="ok"]', { timeout: 120000 });
      await page.waitForSelector('#vm-state[data-state="stopped"]');
      await dashboard.waitForSelector(`tr[data-vm="${VM}"][data-state="stopped"]`, { timeout: 10000 });
      await shot(dashboard, '08-dashboard-stopped');
      await page.click('button[data-action="delete"]');
      await page.waitForURL(`${BASE}/`, { timeout: 120000 });
      await dashboard.waitForSelector(`tr[data-vm="${VM}"]`, { state: 'detached', timeout: 10000 });
      result.dashboard_never_reloaded = await dashboard.evaluate(() => window.neverReloaded === true);
    });
  } catch (e) {
    result.failed_step = current;
    result.error = String(e && e.stack || e);
    await shot(page, 'failure').catch(() => {});
  }
  result.page_errors = pageErrors;
  result.total_ms = Date.now() - t0;
  console.log('RESULT ' + JSON.stringify(result));
  await browser.close();
})();
