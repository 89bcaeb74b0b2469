// banger web UI: a single page over the daemon's HTTP API (/api/*), with no
// framework and no build step. Every piece of text that comes from the API
// (and so possibly from a guest: console output, process names, VM names)
// reaches the page through textContent or attribute setters, never as HTML.
'use strict';

// ---------------------------------------------------------------------------
// DOM helpers

/** el('td', {class: 'num'}, 'text', childNode, ...): text children become text nodes. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function link(href, ...children) {
  return el('a', { href, 'data-link': true }, ...children);
}

function badge(text) {
  return el('span', { class: 'badge ' + String(text).toLowerCase() }, text);
}

function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

const SVG = 'http://www.w3.org/2000/svg';

// ---------------------------------------------------------------------------
// Formatting

function mib(bytes) {
  return bytes === undefined || bytes === null ? '—' : (bytes / 1048576).toFixed(0) + ' MiB';
}

function size(bytes) {
  if (bytes === undefined || bytes === null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + ' ' + units[i];
}

function duration(secs) {
  if (secs === undefined || secs === null) return '—';
  secs = Math.floor(secs);
  const d = Math.floor(secs / 86400), h = Math.floor(secs / 3600) % 24, m = Math.floor(secs / 60) % 60, s = secs % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : '—';
}

// ---------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, body) {
    const e = body && typeof body === 'object' ? body : { message: String(body || '') };
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code;
    this.opId = e.op_id;
  }
}

async function api(method, path, body) {
  const opts = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin' };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (r.status === 401) loggedOut();
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

const vmPath = (name, rest = '') => `/api/vms/${encodeURIComponent(name)}${rest}`;

/** An error as the page shows it: the message, the code and the op id to grep the daemon log for. */
function errorBox(err) {
  const parts = [err.message || String(err)];
  if (err.code) parts.push(`code: ${err.code}`);
  if (err.opId) parts.push(`op id: ${err.opId}`);
  return el('div', { class: 'error-box', 'data-error': err.code || 'error' }, parts.join('\n'));
}

function loggedOut() {
  stopPage();
  replace(document.getElementById('main'),
    el('div', { class: 'card' },
      el('h1', {}, 'Not logged in'),
      el('p', {}, 'Run ', el('code', {}, 'banger web'),
        ' in a terminal on this machine and open the login link it prints.')));
}

// ---------------------------------------------------------------------------
// Live streams. Each page registers what it opened; leaving the page closes it.

let cleanups = [];

function onLeave(fn) { cleanups.push(fn); }

function stopPage() {
  for (const fn of cleanups.splice(0)) {
    try { fn(); } catch (e) { console.error(e); }
  }
}

function stream(path, handlers) {
  const es = new EventSource(path);
  for (const [event, fn] of Object.entries(handlers)) {
    es.addEventListener(event, (e) => fn(JSON.parse(e.data)));
  }
  const conn = document.getElementById('conn');
  es.addEventListener('open', () => { conn.className = 'conn live'; conn.textContent = 'live'; });
  es.addEventListener('error', () => {
    if (es.readyState !== EventSource.OPEN) { conn.className = 'conn down'; conn.textContent = 'reconnecting'; }
  });
  onLeave(() => es.close());
  return es;
}

function every(ms, fn) {
  let stopped = false, timer = null;
  const tick = async () => {
    try { await fn(); } catch (e) { console.warn(e); }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  onLeave(() => { stopped = true; clearTimeout(timer); });
}

/**
 * Follow an operation's stages (`/api/ops/{op_id}` as Server-Sent Events) into
 * `box`. The stream replays the stages so far, so a reconnect redraws nothing
 * twice. Resolves with the operation's result, or rejects with its error.
 */
function followOp(opId, box) {
  const list = el('ol', { class: 'stages', 'data-op': opId });
  const rows = new Map();
  replace(box, el('div', { class: 'muted' }, 'operation ', link(`/ops/${opId}`, el('code', {}, opId))), list);
  return new Promise((resolve, reject) => {
    const es = stream(`/api/ops/${encodeURIComponent(opId)}`, {
      stage: (ev) => {
        let row = rows.get(ev.stage);
        if (!row) {
          row = el('li', { 'data-stage': ev.stage });
          rows.set(ev.stage, row);
          list.append(row);
        }
        row.setAttribute('data-status', ev.status);
        replace(row,
          el('span', { class: 'name' }, ev.stage),
          badge(ev.status),
          ev.elapsed_ms !== undefined ? el('span', { class: 'ms' }, `${ev.elapsed_ms} ms`) : null,
          ev.detail ? el('span', { class: 'muted' }, ev.detail) : null);
      },
      end: (end) => {
        es.close();
        box.setAttribute('data-op-end', end.ok ? 'ok' : 'failed');
        if (end.ok) {
          box.append(el('div', { class: 'ok-box' }, 'done'));
          resolve(end.result);
        } else {
          const err = new ApiError(0, end.error);
          box.append(errorBox(err));
          reject(err);
        }
      },
    });
  });
}

/** Start a long operation (an API call answering 202 {op_id}) and follow it in `box`. */
async function runOp(box, method, path, body) {
  try {
    const { op_id } = await api(method, path, body);
    return await followOp(op_id, box);
  } catch (err) {
    if (!box.querySelector('.error-box')) box.append(errorBox(err));
    throw err;
  }
}

// ---------------------------------------------------------------------------
// Guest statistics: CPU use is the busy share of the CPU ticks between two samples.

function cpuBusy(cpu) {
  const total = cpu.user + cpu.nice + cpu.system + cpu.idle + cpu.iowait + cpu.irq + cpu.softirq + cpu.steal;
  return { total, busy: total - cpu.idle - cpu.iowait };
}

class StatsTracker {
  constructor(limit = 90) { this.limit = limit; this.samples = []; }
  push(stats) {
    const prev = this.samples[this.samples.length - 1];
    const now = cpuBusy(stats.cpu);
    let cpuPct = null;
    if (prev) {
      const dt = now.total - prev.ticks.total;
      cpuPct = dt > 0 ? (100 * (now.busy - prev.ticks.busy)) / dt : 0;
    }
    const memUsed = stats.memory.total_bytes - stats.memory.available_bytes;
    this.samples.push({ ticks: now, cpuPct, memUsed, memTotal: stats.memory.total_bytes, uptime: stats.uptime_secs });
    if (this.samples.length > this.limit) this.samples.shift();
    return this.samples[this.samples.length - 1];
  }
  series(key) { return this.samples.map((s) => s[key]).filter((v) => v !== null); }
}

function sparkline(values, max) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', '0 0 100 100');
  svg.setAttribute('preserveAspectRatio', 'none');
  if (values.length > 1) {
    const top = max || Math.max(...values, 1);
    const pts = values.map((v, i) => `${(100 * i) / (values.length - 1)},${100 - (100 * v) / top}`);
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', pts.join(' '));
    svg.append(line);
  }
  return svg;
}

// ---------------------------------------------------------------------------
// Pages

function page(title, ...children) {
  document.title = `${title} · banger`;
  return replace(document.getElementById('main'), ...children);
}

function dashboard() {
  const tbody = el('tbody');
  const empty = el('div', { class: 'empty' }, 'No VMs yet. ', link('/new', 'Create one'), '.');
  const table = el('table', { 'data-table': 'vms' },
    el('thead', {}, el('tr', {},
      el('th', {}, 'Name'), el('th', {}, 'State'), el('th', {}, 'Image'), el('th', {}, 'Address'),
      el('th', { class: 'num' }, 'Uptime'), el('th', { class: 'num' }, 'CPU'), el('th', { class: 'num' }, 'Memory'))),
    tbody);
  page('VMs', el('h1', {}, 'VMs'), el('div', { class: 'card' }, table, empty));

  const rows = new Map(); // name -> {tr, cells, tracker}
  let vms = [];
  const cell = (field, cls) => el('td', { 'data-field': field, class: cls });
  const render = (list) => {
    vms = list;
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
    const seen = new Set();
    for (const vm of list) {
      seen.add(vm.name);
      let row = rows.get(vm.name);
      if (!row) {
        const cells = {
          name: cell('name'), state: cell('state'), image: cell('image'), address: cell('address'),
          uptime: cell('uptime', 'num'), cpu: cell('cpu', 'num'), memory: cell('memory', 'num'),
        };
        row = { tr: el('tr', { 'data-vm': vm.name }, Object.values(cells)), cells, tracker: new StatsTracker(2) };
        replace(cells.name, link(`/vms/${encodeURIComponent(vm.name)}`, vm.name));
        rows.set(vm.name, row);
      }
      tbody.append(row.tr); // keeps the API's order
      row.tr.setAttribute('data-state', vm.state);
      replace(row.cells.state, badge(vm.state));
      row.cells.image.textContent = vm.image;
      row.cells.address.textContent = vm.guest_ip || '—';
      if (vm.state !== 'running') {
        row.cells.uptime.textContent = row.cells.cpu.textContent = '—';
        row.cells.memory.textContent = mib(vm.memory_mib * 1048576);
        row.tracker = new StatsTracker(2);
      }
    }
    for (const [name, row] of rows) {
      if (!seen.has(name)) { row.tr.remove(); rows.delete(name); }
    }
  };
  stream('/api/vms', { vms: render });
  // CPU and memory from each running guest's agent, a few guests at a time.
  every(3000, async () => {
    const running = vms.filter((v) => v.state === 'running');
    for (let i = 0; i < running.length; i += 4) {
      await Promise.all(running.slice(i, i + 4).map(async (vm) => {
        const row = rows.get(vm.name);
        if (!row) return;
        try {
          const s = row.tracker.push(await api('GET', vmPath(vm.name, '/stats')));
          row.cells.uptime.textContent = duration(s.uptime);
          row.cells.cpu.textContent = s.cpuPct === null ? '…' : `${s.cpuPct.toFixed(0)}%`;
          row.cells.memory.textContent = `${mib(s.memUsed)} / ${mib(s.memTotal)}`;
        } catch {
          row.cells.cpu.textContent = '—';
        }
      }));
    }
  });
}

/** "8080:80, 127.0.0.1:9000:9000" → [PortForwardSpec]; throws naming the bad entry. */
function parseForwards(text) {
  const out = [];
  for (const part of text.split(/[\s,]+/).filter(Boolean)) {
    const m = /^(?:([0-9.]+):)?(\d{1,5}):(\d{1,5})$/.exec(part);
    if (!m) throw new Error(`port forward "${part}": write HOST_PORT:GUEST_PORT, e.g. 8080:80`);
    const spec = { host_port: Number(m[2]), guest_port: Number(m[3]) };
    if (m[1]) spec.bind = m[1];
    out.push(spec);
  }
  return out;
}

function newVm() {
  const imageSelect = el('select', { name: 'image', id: 'f-image' }, el('option', { value: '' }, '(the default image)'));
  const field = (label, input, hint) => [el('label', { for: input.id }, label), el('div', {}, input, hint ? el('div', { class: 'hint' }, hint) : null)];
  const num = (id, placeholder) => el('input', { id, name: id.slice(2), type: 'number', min: 1, placeholder });
  const name = el('input', { id: 'f-name', name: 'name', placeholder: 'generated when empty', autocomplete: 'off' });
  const vcpus = num('f-vcpus', 'image default');
  const memory = num('f-memory', 'MiB');
  const disk = num('f-disk', 'MiB');
  const ports = el('input', { id: 'f-ports', name: 'ports', placeholder: '8080:80, 9000:9000', autocomplete: 'off' });
  const net = el('input', { id: 'f-net', name: 'net', placeholder: 'nat, none, learn or allow=LIST', autocomplete: 'off' });
  const workspace = el('input', { id: 'f-workspace', name: 'workspace', placeholder: '/home/you/project', autocomplete: 'off' });
  const submit = el('button', { class: 'primary', type: 'submit' }, 'Create');
  const progress = el('div', { id: 'create-progress' });
  const form = el('form', { class: 'stack', id: 'create-form' },
    field('Name', name), field('Image', imageSelect), field('vCPUs', vcpus), field('Memory (MiB)', memory),
    field('Work disk (MiB)', disk), field('Port forwards', ports, 'HOST_PORT:GUEST_PORT, on 127.0.0.1'),
    field('Network', net, 'empty: the configured default policy'),
    field('Workspace', workspace, 'a git checkout on this host, copied into the VM at /root/<name> once it runs'),
    el('div', { class: 'full actions' }, submit));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const params = {};
    try {
      if (name.value.trim()) params.name = name.value.trim();
      if (imageSelect.value) params.image = imageSelect.value;
      if (vcpus.value) params.vcpus = Number(vcpus.value);
      if (memory.value) params.memory_mib = Number(memory.value);
      if (disk.value) params.disk_mib = Number(disk.value);
      const fwd = parseForwards(ports.value);
      if (fwd.length) params.ports = fwd;
      if (net.value.trim()) params.net = net.value.trim();
      if (workspace.value.trim() && !workspace.value.trim().startsWith('/')) {
        throw new Error('the workspace is a path on this host: give it from / (e.g. /home/you/project)');
      }
    } catch (err) {
      replace(progress, errorBox(err));
      return;
    }
    submit.disabled = true;
    try {
      const vm = await runOp(progress, 'POST', '/api/vms', params);
      if (workspace.value.trim()) {
        const ws = el('div', { id: 'workspace-progress' });
        progress.append(el('h2', {}, 'Workspace'), ws);
        const info = await runOp(ws, 'POST', vmPath(vm.name, '/workspace'), { path: workspace.value.trim() });
        ws.append(el('p', {}, 'The checkout is at ', el('code', { 'data-workspace': info.dest }, info.dest), ' in the VM.'));
      }
      progress.append(el('p', {}, 'VM ', link(`/vms/${encodeURIComponent(vm.name)}`, el('strong', { 'data-created': vm.name }, vm.name)), ' is running.'));
    } catch { /* shown in the progress box */ }
    submit.disabled = false;
  });
  page('New VM', el('h1', {}, 'New VM'), el('div', { class: 'card' }, form), el('div', { class: 'card' }, el('h2', {}, 'Progress'), progress));
  api('GET', '/api/images').then((images) => {
    for (const img of images.filter((i) => i.state === 'ready')) {
      imageSelect.append(el('option', { value: img.name }, img.name + (img.is_default ? ' (default)' : '')));
    }
  }).catch((err) => progress.append(errorBox(err)));
}

function vmPage(name) {
  const title = el('span', {}, name);
  const state = el('span', { id: 'vm-state' });
  const activity = el('div', { id: 'vm-activity' });
  const info = el('dl', { class: 'kv', id: 'vm-info' });
  const act = (label, method, path, cls, confirmText) => el('button', {
    class: cls, 'data-action': label.toLowerCase(),
    onclick: async () => {
      if (confirmText && !confirm(confirmText)) return;
      try {
        await runOp(activity, method, path);
        if (label === 'Delete') navigate('/');
      } catch { /* shown in the activity box */ }
    },
  }, label);
  const actions = el('div', { class: 'actions' },
    act('Start', 'POST', vmPath(name, '/start')),
    act('Stop', 'POST', vmPath(name, '/stop')),
    act('Restart', 'POST', vmPath(name, '/restart')),
    act('Delete', 'DELETE', vmPath(name, '?force=true'), 'danger', `Delete ${name} and its disks?`));

  const consoleBox = el('pre', { class: 'console', id: 'console' });
  const cpuChart = el('div', { class: 'chart' });
  const memChart = el('div', { class: 'chart' });
  const ports = el('div', { id: 'vm-ports' });
  const forwards = el('div', { id: 'vm-forwards' });
  const termBox = el('div', { class: 'terminal', id: 'terminal', hidden: true });
  const termButton = el('button', { id: 'open-terminal', onclick: () => openTerminal(name, termBox, termButton) }, 'Open terminal');

  page(name,
    el('h1', {}, title, state),
    el('div', { class: 'card' }, actions, activity),
    el('div', { class: 'grid' },
      el('div', { class: 'card' }, el('h2', {}, 'Details'), info),
      el('div', { class: 'card' }, el('h2', {}, 'Resources'), el('div', { class: 'charts' }, cpuChart, memChart))),
    el('div', { class: 'card' }, el('h2', {}, 'Terminal'), termButton, termBox),
    el('div', { class: 'grid' },
      el('div', { class: 'card' }, el('h2', {}, 'Listening ports'), ports),
      el('div', { class: 'card' }, el('h2', {}, 'Port forwards'), forwards)),
    el('div', { class: 'card' }, el('h2', {}, 'Console'), consoleBox));

  let vm = null;
  let fwdList = [];
  const showInfo = (v) => {
    vm = v;
    replace(state, badge(v.state));
    state.setAttribute('data-state', v.state);
    const rows = [
      ['Image', v.image], ['VMM', `${v.vmm} (${v.init} init)`], ['vCPUs', v.vcpus], ['Memory', `${v.memory_mib} MiB`],
      ['Work disk', `${v.disk_mib} MiB`], ['Address', v.guest_ip], ['MAC', v.mac], ['DNS name', v.dns_name],
      ['Network', v.net], ['VMM pid', v.pid], ['Created', when(v.created_at_ms)], ['Last error', v.last_error],
    ];
    replace(info, rows.filter(([, val]) => val !== undefined && val !== null).map(([k, val]) => [el('dt', {}, k), el('dd', {}, String(val))]));
    for (const b of actions.querySelectorAll('button')) {
      const a = b.getAttribute('data-action');
      b.disabled = (a === 'start' && v.state === 'running') || ((a === 'stop' || a === 'restart') && v.state !== 'running');
    }
    termButton.disabled = v.state !== 'running';
  };
  let portsShown = false;
  api('GET', vmPath(name)).then((v) => {
    showInfo(v);
    if (!portsShown) showPorts().catch((err) => replace(ports, errorBox(err)));
  }).catch((err) => replace(info, errorBox(err)));
  stream('/api/vms', {
    vms: (list) => {
      const v = list.find((x) => x.name === name);
      if (v) showInfo(Object.assign({}, vm || {}, v));
      else if (vm) replace(state, badge('deleted'));
    },
  });

  // Console: the tail, then what the guest writes, appended as text.
  const MAX_CONSOLE = 256 * 1024;
  stream(vmPath(name, '/logs'), {
    log: (chunk) => {
      const atBottom = consoleBox.scrollTop + consoleBox.clientHeight >= consoleBox.scrollHeight - 4;
      consoleBox.append(document.createTextNode(chunk));
      if (consoleBox.textContent.length > MAX_CONSOLE) consoleBox.textContent = consoleBox.textContent.slice(-MAX_CONSOLE / 2);
      if (atBottom) consoleBox.scrollTop = consoleBox.scrollHeight;
    },
  });

  const tracker = new StatsTracker(90);
  const drawCharts = () => {
    const last = tracker.samples[tracker.samples.length - 1];
    replace(cpuChart, el('div', {}, 'CPU ', el('span', { class: 'now', 'data-now': 'cpu' }, last && last.cpuPct !== null ? `${last.cpuPct.toFixed(0)}%` : '…')),
      sparkline(tracker.series('cpuPct'), 100));
    replace(memChart, el('div', {}, 'Memory ', el('span', { class: 'now', 'data-now': 'memory' }, last ? `${mib(last.memUsed)} / ${mib(last.memTotal)}` : '…')),
      sparkline(tracker.series('memUsed'), last ? last.memTotal : 1));
  };
  drawCharts();
  every(2000, async () => {
    if (!vm || vm.state !== 'running') return;
    tracker.push(await api('GET', vmPath(name, '/stats')));
    drawCharts();
  });

  const showPorts = async () => {
    if (!vm) return;
    portsShown = true;
    if (vm.state !== 'running') { replace(ports, el('p', { class: 'muted' }, 'The VM is not running.')); return; }
    const res = await api('GET', vmPath(name, '/ports'));
    const sockets = (res.sockets || []).slice().sort((a, b) => a.port - b.port);
    const body = el('tbody');
    for (const s of sockets) {
      const fwd = s.protocol === 'tcp' && fwdList.find((f) => f.guest_port === s.port && f.status === 'active');
      const bind = fwd && (fwd.bind === '0.0.0.0' ? location.hostname : fwd.bind);
      body.append(el('tr', { 'data-port': s.port },
        el('td', {}, s.protocol), el('td', { class: 'mono' }, `${s.address}:${s.port}`),
        el('td', {}, s.process ? `${s.process.name} (${s.process.pid})` : '—'),
        el('td', {}, fwd ? el('a', { href: `http://${bind}:${fwd.host_port}/`, target: '_blank', rel: 'noopener', 'data-forward-link': fwd.host_port }, `${bind}:${fwd.host_port}`) : '')));
    }
    replace(ports, sockets.length
      ? el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'Proto'), el('th', {}, 'Address'), el('th', {}, 'Process'), el('th', {}, 'Forwarded at'))), body)
      : el('p', { class: 'muted' }, 'Nothing listens.'));
  };

  const hostPort = el('input', { class: 'port', type: 'number', min: 1, max: 65535, placeholder: 'host', id: 'fwd-host' });
  const guestPort = el('input', { class: 'port', type: 'number', min: 1, max: 65535, placeholder: 'guest', id: 'fwd-guest' });
  const fwdError = el('div');
  const fwdForm = el('form', { class: 'inline', id: 'forward-form' }, hostPort, '→', guestPort, el('button', { type: 'submit' }, 'Add forward'));
  const fwdTable = el('div');
  const showForwards = (list) => {
    fwdList = list;
    const body = el('tbody');
    for (const f of list) {
      body.append(el('tr', { 'data-forward': f.host_port },
        el('td', { class: 'mono' }, `${f.bind}:${f.host_port}`), el('td', { class: 'mono' }, `guest :${f.guest_port}`),
        el('td', {}, badge(f.status), f.error ? el('div', { class: 'hint' }, f.error) : null),
        el('td', {}, el('button', {
          class: 'danger', 'data-remove-forward': f.host_port,
          onclick: async () => {
            try {
              await api('DELETE', vmPath(name, `/forwards/${f.host_port}`));
              await loadForwards();
            } catch (err) { replace(fwdError, errorBox(err)); }
          },
        }, 'Remove'))));
    }
    replace(fwdTable, list.length ? el('table', {}, body) : el('p', { class: 'muted' }, 'No forwards.'));
  };
  const loadForwards = async () => showForwards(await api('GET', vmPath(name, '/forwards')));
  fwdForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    replace(fwdError);
    try {
      showForwards(await api('POST', vmPath(name, '/forwards'), {
        forwards: [{ host_port: Number(hostPort.value), guest_port: Number(guestPort.value) }],
      }));
      hostPort.value = guestPort.value = '';
      await showPorts();
    } catch (err) { replace(fwdError, errorBox(err)); }
  });
  replace(forwards, fwdTable, fwdForm, fwdError);
  loadForwards().catch((err) => replace(fwdError, errorBox(err)));
  every(5000, () => showPorts().catch((err) => replace(ports, errorBox(err))));
}

/** A shell in the guest: xterm.js over the terminal WebSocket (raw pty bytes both ways). */
function openTerminal(name, box, button) {
  button.hidden = true;
  box.hidden = false;
  const term = new Terminal({ cursorBlink: true, fontSize: 13, scrollback: 5000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}${vmPath(name, '/terminal')}`);
  ws.binaryType = 'arraybuffer';
  const enc = new TextEncoder();
  const size = () => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ cols: term.cols, rows: term.rows })); };
  ws.onopen = () => { box.setAttribute('data-connected', ''); size(); term.focus(); };
  ws.onmessage = (e) => term.write(typeof e.data === 'string' ? e.data : new Uint8Array(e.data));
  ws.onclose = (e) => {
    box.removeAttribute('data-connected');
    term.write(`\r\n[terminal closed${e.reason ? ': ' + e.reason : ''}]\r\n`);
    button.hidden = false;
    button.textContent = 'Reconnect';
  };
  const input = term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(enc.encode(d)); });
  const resize = term.onResize(size);
  const onWindow = () => fit.fit();
  window.addEventListener('resize', onWindow);
  const close = () => { input.dispose(); resize.dispose(); window.removeEventListener('resize', onWindow); ws.close(); term.dispose(); };
  button.onclick = () => { close(); replace(box); openTerminal(name, box, button); };
  onLeave(close);
}

function imagesPage() {
  const list = el('div', { id: 'images' });
  const progress = el('div', { id: 'image-progress' });
  const load = async () => {
    const images = await api('GET', '/api/images');
    const body = el('tbody');
    for (const img of images) {
      body.append(el('tr', { 'data-image': img.name },
        el('td', {}, el('strong', {}, img.name), img.is_default ? ' ' : null, img.is_default ? badge('default') : null),
        el('td', {}, badge(img.state), img.last_error ? el('div', { class: 'hint' }, img.last_error) : null),
        el('td', { class: 'mono' }, img.source), el('td', {}, img.default_init),
        el('td', { class: 'num' }, size(img.disk_bytes)), el('td', {}, when(img.created_at_ms)),
        el('td', {}, el('div', { class: 'actions' },
          el('button', {
            disabled: img.is_default || img.state !== 'ready', 'data-promote': img.name,
            onclick: async () => { try { await api('POST', `/api/images/${encodeURIComponent(img.name)}/promote`); await load(); } catch (err) { replace(progress, errorBox(err)); } },
          }, 'Make default'),
          el('button', {
            class: 'danger', 'data-delete-image': img.name,
            onclick: async () => {
              if (!confirm(`Delete image ${img.name}?`)) return;
              try { await api('DELETE', `/api/images/${encodeURIComponent(img.name)}`); await load(); } catch (err) { replace(progress, errorBox(err)); }
            },
          }, 'Delete')))));
    }
    replace(list, images.length
      ? el('table', {}, el('thead', {}, el('tr', {}, ['Name', 'State', 'Source', 'Init', 'On disk', 'Created', ''].map((h) => el('th', { class: h === 'On disk' ? 'num' : null }, h)))), body)
      : el('div', { class: 'empty' }, 'No images yet: build one below.'));
  };
  const opForm = (id, label, inputs, makeBody, path) => {
    const form = el('form', { class: 'inline', id }, inputs, el('button', { type: 'submit', class: 'primary' }, label));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      let body;
      try { body = makeBody(); } catch (err) { replace(progress, errorBox(err)); return; }
      try { await runOp(progress, 'POST', path, body); } catch { /* shown */ }
      load().catch(() => {});
    });
    return form;
  };
  const recipe = el('input', { placeholder: 'recipe, e.g. debian-12 or dev', list: 'recipes', id: 'build-name' });
  const ref = el('input', { placeholder: 'registry/repository:tag', id: 'pull-ref', size: 36 });
  const pullName = el('input', { placeholder: 'name (optional)', id: 'pull-name' });
  page('Images',
    el('h1', {}, 'Images'),
    el('div', { class: 'card' }, list),
    el('div', { class: 'grid' },
      el('div', { class: 'card' }, el('h2', {}, 'Build from a recipe'),
        el('datalist', { id: 'recipes' }, el('option', { value: 'debian-12' }), el('option', { value: 'dev' })),
        opForm('build-form', 'Build', [recipe], () => {
          if (!recipe.value.trim()) throw new Error('name the recipe to build');
          return { name: recipe.value.trim() };
        }, '/api/images/build')),
      el('div', { class: 'card' }, el('h2', {}, 'Pull from an OCI registry'),
        opForm('pull-form', 'Pull', [ref, pullName], () => {
          if (!ref.value.trim()) throw new Error('give an image reference to pull');
          const b = { reference: ref.value.trim() };
          if (pullName.value.trim()) b.name = pullName.value.trim();
          return b;
        }, '/api/images/pull'))),
    el('div', { class: 'card' }, el('h2', {}, 'Progress'), progress));
  load().catch((err) => replace(list, errorBox(err)));
}

function doctorPage() {
  const box = el('div', { id: 'doctor' }, el('p', { class: 'muted' }, 'Checking the host…'));
  page('Doctor', el('h1', {}, 'Doctor'), el('div', { class: 'card' }, box));
  api('GET', '/api/doctor').then((report) => {
    const body = el('tbody');
    for (const c of report.checks) {
      const status = String(c.status).toLowerCase();
      body.append(el('tr', { 'data-check': c.id, 'data-status': status },
        el('td', {}, badge(status)), el('td', {}, c.title), el('td', {}, c.detail),
        el('td', {}, c.fix ? el('code', {}, c.fix) : '')));
    }
    replace(box,
      el('p', {}, `${report.checks.length} checks: ${report.failed} failed, ${report.warned} warnings`),
      el('table', {}, el('thead', {}, el('tr', {}, ['', 'Check', 'Found', 'Fix'].map((h) => el('th', {}, h)))), body));
  }).catch((err) => replace(box, errorBox(err)));
}

function opPage(opId) {
  const head = el('div', { class: 'muted' });
  const box = el('div', { id: 'op' });
  page(`Operation ${opId}`, el('h1', {}, 'Operation ', el('code', {}, opId)), el('div', { class: 'card' }, head, box));
  api('GET', `/api/ops/${encodeURIComponent(opId)}`).then((st) => {
    replace(head, `${st.kind} of ${st.subject}`);
    followOp(opId, box).catch(() => {});
  }).catch((err) => replace(box, errorBox(err)));
}

function notFound() {
  page('Not found', el('h1', {}, 'Not found'), el('p', {}, 'Nothing lives at this address. ', link('/', 'Back to the VMs'), '.'));
}

// ---------------------------------------------------------------------------
// Routing: the daemon serves this page at every UI path; the path picks the view.

const routes = [
  [/^\/$/, () => dashboard(), 'dashboard'],
  [/^\/new$/, () => newVm(), 'new'],
  [/^\/images$/, () => imagesPage(), 'images'],
  [/^\/doctor$/, () => doctorPage(), 'doctor'],
  [/^\/vms\/([^/]+)$/, (m) => vmPage(decodeURIComponent(m[1])), 'dashboard'],
  [/^\/ops\/([^/]+)$/, (m) => opPage(decodeURIComponent(m[1])), null],
];

function render() {
  stopPage();
  const path = location.pathname;
  for (const [re, view, nav] of routes) {
    const m = re.exec(path);
    if (!m) continue;
    for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.getAttribute('data-nav') === nav);
    view(m);
    return;
  }
  notFound();
}

function navigate(path) {
  history.pushState(null, '', path);
  render();
}

document.addEventListener('click', (e) => {
  const a = e.target.closest('a[data-link]');
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  navigate(a.getAttribute('href'));
});
window.addEventListener('popstate', render);
render();
