// The web dashboard's figures for scripts/bench.sh (section `web`): Debian's
// chromium, headless, through playwright-core (target/browser, installed by
// scripts/deps.sh --test). Prints one line `RESULT {json}`; asserts nothing.
//
// Environment: LOGIN_URL (from `banger web --json`), COUNT (how many VMs the
// dashboard must list), STOP (comma-separated running VMs to stop, one at a
// time, each a state change the dashboard must show).
//
// For each stop it takes three times on the page's clock: the request, the
// moment a second, independent `/api/vms` stream first reports the VM
// stopped (the daemon's state change as any client sees it), and the moment
// the dashboard's row shows it.
'use strict';
const { chromium } = require('playwright-core');

(async () => {
  const login = process.env.LOGIN_URL;
  const count = Number(process.env.COUNT);
  const stop = (process.env.STOP || '').split(',').filter(Boolean);
  const base = new URL(login).origin;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const result = { count };
  try {
    await page.goto(login);
    const t = Date.now();
    await page.goto(`${base}/`);
    await page.waitForFunction((n) => document.querySelectorAll('tr[data-vm]').length === n, count, { timeout: 60000, polling: 'raf' });
    result.render_ms = Date.now() - t;
    result.changes = [];
    for (const vm of stop) {
      const sample = await page.evaluate(async (vm) => {
        const row = () => document.querySelector(`tr[data-vm="${vm}"]`);
        const times = {};
        const shown = new Promise((resolve) => {
          const obs = new MutationObserver(() => {
            if (row()?.getAttribute('data-state') === 'stopped') { times.dom = performance.now(); obs.disconnect(); resolve(); }
          });
          obs.observe(row(), { attributes: true, attributeFilter: ['data-state'] });
        });
        const es = new EventSource('/api/vms');
        const streamed = new Promise((resolve) => es.addEventListener('vms', (e) => {
          const v = JSON.parse(e.data).find((x) => x.name === vm);
          if (v && v.state === 'stopped') { times.stream = performance.now(); es.close(); resolve(); }
        }));
        await new Promise((resolve) => es.addEventListener('open', resolve, { once: true }));
        times.request = performance.now();
        const r = await fetch(`/api/vms/${encodeURIComponent(vm)}/stop`, { method: 'POST' });
        if (r.status !== 202) throw new Error(`stop ${vm}: HTTP ${r.status}`);
        await Promise.all([shown, streamed]);
        return { request_to_dom_ms: times.dom - times.request, stream_to_dom_ms: times.dom - times.stream };
      }, vm);
      result.changes.push(sample);
    }
  } catch (e) {
    result.error = String(e && e.stack || e);
  }
  console.log('RESULT ' + JSON.stringify(result));
  await browser.close();
})();
