// Anchorage web console. Plain JavaScript, no build step, no external request.
//
// - The bearer token lives in sessionStorage (this tab only) and goes out in an Authorization
//   header on same-origin fetch() calls; never in a URL.
// - Everything shown comes from /console/v1. Strings from the network are put in the page with
//   textContent and DOM nodes only, never parsed as HTML.
// - Live updates: fetch() on /console/v1/events (EventSource cannot send headers), the SSE
//   stream parsed here; each change re-reads the view it concerns. Reconnects with backoff.
// - What the token may do comes from GET /console/v1/whoami; actions it lacks are hidden or
//   disabled (the API refuses them anyway).
// - Batches: the inventory's selector is evaluated by the anchor (GET /inventory?selector=),
//   so the trusted devices listed are those POST /batches picks; a batch's page follows its
//   `batch` events and re-reads it every second until it is done.
'use strict';

(() => {
  const TOKEN_KEY = 'anchorage.console.token';
  const API = '/console/v1';
  const PERM = {
    read: 'observability.read',
    trust: 'trust.operate',
    invoke: 'nodes.invoke',
    tokens: 'tokens.manage',
  };
  const PRESENCE_ORDER = ['online', 'degraded', 'stale', 'offline', 'unknown'];
  const BUILTIN_CAPABILITIES = ['system.health', 'system.info', 'system.identity', 'echo'];
  const BACKOFF_SECS = [1, 2, 4, 8, 15, 30];
  // The anchor sends a keep-alive comment every 15 s; silence for longer means a dead link.
  const STREAM_SILENCE_MS = 45000;
  // How often the inventory and device pages re-read heartbeat ages, loss and RTT.
  const HEARTBEAT_REFRESH_MS = 10000;
  const SUCCESS_BANNER_MS = 6000;
  // How long the selector field waits after a keystroke before asking the anchor.
  const SELECTOR_DEBOUNCE_MS = 300;
  // Rows of the inventory table per page: the anchor filters, sorts and sends one page at a
  // time (GET /inventory?limit=&offset=), so a fleet of ten thousand stays quick to show.
  const PAGE_SIZE = 100;
  // How often a running batch's page re-reads it (its events carry counts, not outputs).
  const BATCH_POLL_MS = 1000;
  // Longest output shown inline in a batch's table; longer ones fold into a <details>.
  const INLINE_OUTPUT_CHARS = 400;
  const DAY_SECS = 86400;
  // Hours of history the device page shows.
  const HISTORY_HOURS = 6;
  const SVG = 'http://www.w3.org/2000/svg';

  const state = {
    token: null,
    me: null,
    route: { view: 'signin' },
    inventory: null,
    inventoryAt: 0,
    inventoryNotice: null,
    filters: { presence: '', trust: '', text: '', selector: '' },
    // The inventory table's page, from 0.
    inventoryPage: 0,
    // The selector the shown inventory was read with, and the anchor's word on a bad one.
    inventorySelector: '',
    selectorError: null,
    batchSubmitting: false,
    // The batch whose page is open (from POST /batches, then GET /batches/{id}).
    batch: null,
    // Whether the batches list shown has one not done yet.
    batchesRunning: false,
    stream: { ctl: null, attempt: 0, timer: null, lastByteAt: 0, status: 'off' },
    refreshTimer: null,
    refreshing: false,
    refreshAgain: false,
    minted: null,
    mintedQrUrl: null,
    lastInvocation: null,
    // The inventory's order: none is problems first; else a column and 1 or -1.
    sort: { key: null, dir: 1 },
    // The rows ticked for a bulk action (device id → its entry), on any page.
    selected: new Map(),
  };

  // ---------------------------------------------------------------------------------------
  // Small DOM helpers

  const $ = (id) => document.getElementById(id);

  /** Creates an element. `props`: class, text, data (dataset), on (listeners), attrs. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    const p = props || {};
    if (p.class) node.className = p.class;
    if (p.text !== undefined && p.text !== null) node.textContent = String(p.text);
    if (p.data) for (const [k, v] of Object.entries(p.data)) node.dataset[k] = v;
    if (p.on) for (const [k, v] of Object.entries(p.on)) node.addEventListener(k, v);
    if (p.attrs) {
      for (const [k, v] of Object.entries(p.attrs)) {
        if (v === false || v === null || v === undefined) continue;
        node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function replace(container, ...children) {
    const node = typeof container === 'string' ? $(container) : container;
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  }

  function button(label, onClick, props) {
    const p = props || {};
    return el('button', {
      class: p.class || '',
      text: label,
      attrs: { type: 'button', disabled: p.disabled, title: p.title, id: p.id, 'aria-label': p.ariaLabel },
      data: p.data,
      on: { click: onClick },
    });
  }

  function badge(kind, value) {
    const v = value || 'unknown';
    return el('span', { class: `badge ${kind}-${v.replace(/[^a-z_]/g, '')}`, text: v.replace(/_/g, ' '), data: { kind } });
  }

  function warningBadge(w) {
    return el('span', { class: 'badge warn', text: w.replace(/_/g, ' '), data: { warning: w } });
  }

  function can(permission) {
    return !!(state.me && state.me.permissions.includes(permission));
  }

  // ---------------------------------------------------------------------------------------
  // Time

  function parseTime(iso) {
    if (!iso) return null;
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  /** "12 s", "4 min", "3 h", "2 d" for a positive number of milliseconds. */
  function span(ms) {
    const s = Math.round(Math.abs(ms) / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.round(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.round(m / 60);
    if (h < 48) return `${h} h`;
    return `${Math.round(h / 24)} d`;
  }

  function relative(ms) {
    if (ms === null || ms === undefined) return '—';
    const d = ms - Date.now();
    if (Math.abs(d) < 1500) return 'now';
    return d < 0 ? `${span(d)} ago` : `in ${span(d)}`;
  }

  /** A <time> that keeps saying how long ago (or until) `iso` is; the ticker updates it. */
  function timeEl(iso) {
    const t = parseTime(iso);
    if (t === null) return el('span', { class: 'muted', text: '—' });
    return el('time', {
      text: relative(t),
      data: { at: String(t) },
      attrs: { datetime: iso, title: new Date(t).toISOString().replace('.000Z', 'Z') },
    });
  }

  /** An age ("3 s ago") known at `fetchedAt` as `ageMs`, kept current by the ticker. */
  function ageEl(ageMs, fetchedAt) {
    if (ageMs === null || ageMs === undefined) return el('span', { class: 'muted', text: '—' });
    const at = fetchedAt - ageMs;
    return el('time', { text: relative(at), data: { at: String(at) } });
  }

  function tick() {
    for (const t of document.querySelectorAll('[data-at]')) {
      const text = relative(Number(t.dataset.at));
      if (t.textContent !== text) t.textContent = text;
    }
    for (const t of document.querySelectorAll('[data-expires]')) {
      const left = Number(t.dataset.expires) - Date.now();
      const text = left > 0 ? `expires in ${span(left)}` : 'expired';
      if (t.textContent !== text) t.textContent = text;
      t.classList.toggle('expired', left <= 0);
    }
  }

  function absolute(iso) {
    const t = parseTime(iso);
    return t === null ? '—' : new Date(t).toISOString().replace('.000Z', 'Z').replace('T', ' ');
  }

  function percent(rate) {
    if (rate === null || rate === undefined) return '—';
    const p = rate * 100;
    return `${p < 10 ? p.toFixed(1) : p.toFixed(0)} %`;
  }

  function millis(ms) {
    if (ms === null || ms === undefined) return '—';
    return `${ms < 10 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
  }

  // ---------------------------------------------------------------------------------------
  // Banners and errors

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    toString() {
      return `${this.code}: ${this.message}`;
    }
  }

  function describe(err) {
    if (err instanceof ApiError) return `${err.code}: ${err.message}`;
    return `unreachable: ${err && err.message ? err.message : err}`;
  }

  /** An error banner with the API's {code, message}; `key` replaces an older one. */
  function banner(text, kind, key) {
    const box = $('banners');
    if (key) {
      for (const b of box.querySelectorAll('[data-key]')) if (b.dataset.key === key) b.remove();
    }
    const node = el('div', {
      class: `banner ${kind || 'error'}`,
      attrs: { role: kind === 'info' ? 'status' : 'alert' },
      data: key ? { key } : undefined,
    },
    el('span', { text }),
    button('Dismiss', () => node.remove(), { class: 'secondary small', ariaLabel: 'Dismiss message' }));
    box.append(node);
    // Successes need no answer: they go away by themselves.
    if (kind === 'success') setTimeout(() => node.remove(), SUCCESS_BANNER_MS);
    return node;
  }

  function clearBanner(key) {
    for (const b of $('banners').querySelectorAll('[data-key]')) if (b.dataset.key === key) b.remove();
  }

  function showError(err, key) {
    banner(describe(err), 'error', key);
  }

  function notice(text, kind) {
    return el('div', { class: `notice ${kind || 'info'}`, attrs: { role: 'status' }, text });
  }

  // ---------------------------------------------------------------------------------------
  // API

  async function api(method, path, body, opts) {
    const headers = { Authorization: `Bearer ${(opts && opts.token) || state.token}`, Accept: 'application/json' };
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const res = await fetch(API + path, init);
    if (res.status === 401 && !(opts && opts.token)) {
      signOut('The anchor refused the token (unauthorized). Sign in again.');
      throw new ApiError(401, 'unauthorized', 'the token was refused');
    }
    if (!res.ok) {
      let code = `http_${res.status}`;
      let message = res.statusText || 'error';
      try {
        const e = await res.json();
        if (e && typeof e.code === 'string') {
          code = e.code;
          message = String(e.message || '');
        }
      } catch (_) {
        // Not JSON (a proxy's page): keep the status.
      }
      throw new ApiError(res.status, code, message);
    }
    if (res.status === 204) return { status: 204, data: null };
    const type = res.headers.get('Content-Type') || '';
    const data = type.startsWith('application/json') ? await res.json() : await res.blob();
    return { status: res.status, data };
  }

  const get = async (path) => (await api('GET', path)).data;
  const enc = encodeURIComponent;

  // ---------------------------------------------------------------------------------------
  // Session

  async function signIn(token) {
    const me = (await api('GET', '/whoami', undefined, { token })).data;
    state.token = token;
    state.me = me;
    sessionStorage.setItem(TOKEN_KEY, token);
    startApp();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.me = null;
    state.inventory = null;
    state.minted = null;
    state.batch = null;
    stopStream();
    if (state.mintedQrUrl) URL.revokeObjectURL(state.mintedQrUrl);
    state.mintedQrUrl = null;
    replace('banners');
    for (const id of ['inventory-table', 'summary', 'device-body', 'pending-requests', 'decided-requests', 'codes', 'token-list', 'token-created', 'minted', 'batch-list', 'batch-body']) {
      replace(id);
    }
    $('batch-card').hidden = true;
    $('nav').hidden = true;
    $('session').hidden = true;
    if (location.hash && location.hash !== '#/') history.replaceState(null, '', '#/');
    showView('signin');
    if (message) {
      $('signin-error').textContent = message;
      $('signin-error').hidden = false;
    }
    $('signin-token').focus();
  }

  function startApp() {
    $('signin-error').hidden = true;
    $('signin-token').value = '';
    $('nav').hidden = false;
    $('session').hidden = false;
    $('whoami').textContent = state.me.name;
    $('whoami').title = `token ${state.me.token_id}: ${state.me.permissions.join(', ') || 'no permissions'}${scopeText(state.me.scope, '; ')}`;
    // Hide what this token cannot reach.
    document.querySelector('[data-nav="tokens"]').hidden = !can(PERM.tokens);
    document.querySelector('[data-nav="batches"]').hidden = !can(PERM.read);
    document.querySelector('[data-nav="audit"]').hidden = !can(PERM.read);
    document.querySelector('[data-nav="pairing"]').hidden = !(can(PERM.read) || can(PERM.trust));
    $('pairing-mint').hidden = !can(PERM.trust);
    startStream();
    route();
  }

  // ---------------------------------------------------------------------------------------
  // Routing: #/inventory, #/device/<id>, #/batches, #/batch/<id>, #/pairing, #/audit, #/tokens

  function parseRoute() {
    const h = location.hash.replace(/^#\/?/, '');
    const [view, ...rest] = h.split('/');
    if ((view === 'device' || view === 'batch') && rest.length) return { view, id: decodeURIComponent(rest.join('/')) };
    if (view === 'pairing' || view === 'tokens' || view === 'inventory' || view === 'batches' || view === 'audit') return { view };
    return { view: 'inventory' };
  }

  function showView(name) {
    for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${name}`;
    // A batch's page belongs to the Batches tab.
    const tab = name === 'batch' ? 'batches' : name;
    for (const a of document.querySelectorAll('[data-nav]')) {
      if (a.dataset.nav === tab) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
  }

  function route() {
    if (!state.token) {
      showView('signin');
      return;
    }
    const r = parseRoute();
    const changed = r.view !== state.route.view || r.id !== state.route.id;
    state.route = r;
    showView(r.view);
    if (changed && r.view === 'device') {
      replace('device-body', el('p', { class: 'muted', text: 'Loading…' }));
      state.lastInvocation = null;
    }
    if (changed && r.view === 'batch') {
      // Just created from the inventory: show it at once, then follow it.
      if (state.batch && state.batch.batch_id === r.id) renderBatch(state.batch);
      else {
        state.batch = null;
        replace('batch-body', el('p', { class: 'muted', text: 'Loading…' }));
      }
    }
    document.title = `${{ inventory: 'Inventory', device: 'Device', batches: 'Batches', batch: 'Batch', pairing: 'Pairing', audit: 'Audit', tokens: 'Tokens' }[r.view]} — Anchorage`;
    refresh();
  }

  /** Re-reads the current view, at most one read at a time. */
  async function refresh() {
    if (!state.token) return;
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    state.refreshing = true;
    try {
      const r = state.route;
      if (r.view === 'inventory') await loadInventory();
      else if (r.view === 'device') await loadDevice(r.id);
      else if (r.view === 'batches') await loadBatches();
      else if (r.view === 'batch') await loadBatch(r.id);
      else if (r.view === 'pairing') await loadPairing();
      else if (r.view === 'tokens') await loadTokens();
      else if (r.view === 'audit') await loadAudit();
      clearBanner('refresh');
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) showError(err, 'refresh');
    } finally {
      state.refreshing = false;
      if (state.refreshAgain) {
        state.refreshAgain = false;
        scheduleRefresh();
      }
    }
  }

  function scheduleRefresh(delay) {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(refresh, delay === undefined ? 200 : delay);
  }

  // ---------------------------------------------------------------------------------------
  // Inventory

  /** The order the table asks the anchor for. */
  function sortParam() {
    return state.sort.key ? `${state.sort.dir < 0 ? '-' : ''}${state.sort.key}` : 'problems';
  }

  /** Whether presence, trust or the search narrow the table below what the selector matches. */
  function narrowed() {
    const { presence, trust, text } = state.filters;
    return Boolean(presence || trust || text.trim());
  }

  /** The query of the table's page: the filters, the order and the page. */
  function pageQuery(selector) {
    const { presence, trust, text } = state.filters;
    const q = new URLSearchParams();
    if (selector) q.set('selector', selector);
    if (presence) q.set('presence', presence);
    if (trust) q.set('trust', trust);
    if (text.trim()) q.set('q', text.trim());
    q.set('sort', sortParam());
    q.set('limit', String(PAGE_SIZE));
    q.set('offset', String(state.inventoryPage * PAGE_SIZE));
    return q;
  }

  /** The table's page of the devices `selector` matches (all with none) with the counters of
   * everything the selector matches, or one built from /devices and pending requests when
   * the anchor cannot give presence yet (503). */
  async function fetchInventory(selector) {
    const q = selector ? `?selector=${enc(selector)}` : '';
    try {
      const page = await get(`/inventory?${pageQuery(selector)}`);
      // An anchor that does not page sent everything the selector, presence and trust match.
      if (!page.page) return { inv: pageLocally(page), note: null };
      if (!narrowed()) return { inv: page, note: null };
      // The counters (and a batch) follow the selector alone.
      const whole = await get(`/inventory${q ? `${q}&` : '?'}limit=1`);
      return { inv: { ...page, summary: whole.summary }, note: null };
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 503) throw err;
      const [devices, pending] = await Promise.all([
        get(`/devices${q}`),
        // A pairing request has no labels yet: a selector leaves them out.
        selector ? [] : get('/pairing/requests?state=pending_approval'),
      ]);
      return { inv: pageLocally(fallbackInventory(devices, pending)), note: `Presence, heartbeats and capabilities are not available from this anchor (${err.code}: ${err.message}); showing trust only.` };
    }
  }

  /** The page the anchor would send, made here from every device the selector matches. */
  function pageLocally(inv) {
    const { presence, trust, text } = state.filters;
    const needle = text.trim().toLowerCase();
    const rows = inv.devices
      .filter((d) => (!presence || d.presence === presence) && (!trust || d.trust === trust))
      .filter((d) => !needle || d.name.toLowerCase().includes(needle) || d.device_id.toLowerCase().includes(needle)
        || labelPairs(d.labels).some((l) => l.toLowerCase().includes(needle)))
      .sort(compareDevices);
    const offset = state.inventoryPage * PAGE_SIZE;
    return {
      ...inv,
      devices: rows.slice(offset, offset + PAGE_SIZE),
      page: { total: rows.length, offset, limit: PAGE_SIZE, sort: sortParam() },
    };
  }

  function fallbackInventory(devices, pending) {
    const rows = devices.map((d) => ({
      device_id: d.device_id,
      name: d.name,
      trust: d.trust,
      presence: 'unknown',
      heartbeat_age_ms: null,
      loss_rate: null,
      rtt_ms: null,
      capabilities: { total: 0, available: 0, unavailable: 0 },
      warnings: d.rotation_pending ? ['rotation_pending'] : [],
      // As the anchor's inventory says: a trusted device can be used, rotated, revoked; a
      // revoked one removed.
      actions: d.trust === 'trusted' ? ['invoke', 'rotate', 'revoke'] : ['remove'],
      connected: false,
      connected_since: null,
      last_seen_at: null,
      cert_expires_at: d.cert_expires_at,
      device: d,
      node: null,
      pending_pairings: [],
    }));
    for (const p of pending) {
      const row = rows.find((r) => r.device_id === p.device_id);
      if (row) {
        row.pending_pairings.push(p);
        continue;
      }
      rows.push({
        device_id: p.device_id, name: p.device_name, trust: 'pending', presence: 'unknown',
        heartbeat_age_ms: null, loss_rate: null, rtt_ms: null,
        capabilities: { total: 0, available: 0, unavailable: 0 }, warnings: ['not_registered'],
        actions: ['approve', 'reject'], connected: false, connected_since: null, last_seen_at: null,
        cert_expires_at: null, device: null, node: null, pending_pairings: [p],
      });
    }
    const count = (f) => rows.filter(f).length;
    return {
      summary: {
        devices: rows.length,
        trusted: count((r) => r.trust === 'trusted'),
        revoked: count((r) => r.trust === 'revoked'),
        pending_pairings: pending.length,
        online: 0, degraded: 0, stale: 0, offline: 0, connected: 0,
        with_warnings: count((r) => r.warnings.length > 0),
      },
      devices: rows,
      instances: [],
      fallback: true,
    };
  }

  async function loadInventory() {
    if (!can(PERM.read)) {
      replace('inventory-notice', notice('This token cannot read the inventory: it lacks observability.read.', 'warn'));
      replace('summary');
      replace('inventory-table');
      return;
    }
    const selector = state.filters.selector.trim();
    let fetched;
    try {
      fetched = await fetchInventory(selector);
    } catch (err) {
      // The only query is the selector: a 400 is the anchor saying where it does not parse.
      if (!(selector && err instanceof ApiError && err.status === 400)) throw err;
      state.selectorError = err.message;
      state.inventorySelector = null;
      renderSelectorError();
      replace('summary');
      renderInventoryTable();
      renderBatchCard();
      return;
    }
    const { inv, note } = fetched;
    state.inventory = inv;
    state.inventoryAt = Date.now();
    state.inventorySelector = selector;
    state.selectorError = null;
    renderSelectorError();
    replace('inventory-notice', note ? notice(note, 'info') : null);
    $('inventory-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
    renderSummary();
    renderInventoryTable();
    renderInstances();
    renderBatchCard();
    await loadMesh();
  }

  // ---------------------------------------------------------------------------------------
  // Mesh: the peer connections the nodes report

  async function loadMesh() {
    let links;
    try {
      links = (await api('GET', '/mesh')).data.links;
    } catch (err) {
      replace('mesh-links', el('p', { class: 'empty', text: `The mesh cannot be read: ${describe(err)}` }));
      return;
    }
    renderMesh(links);
  }

  function renderMesh(links) {
    if (!links.length) {
      replace('mesh-links', el('p', { class: 'empty', text: 'No peer connections reported.' }));
      return;
    }
    const side = (id, name) => el('a', { attrs: { href: `#/device/${enc(id)}` }, text: name || id });
    const cell = (label, ...content) => el('td', { data: { label } }, ...content);
    const body = links.map((l) => el('tr', { data: { a: l.a, b: l.b } },
      cell('A', side(l.a, l.a_name)),
      cell('B', side(l.b, l.b_name)),
      cell('Path', badge('path', l.path)),
      cell('Address', el('span', { class: 'mono', text: l.addr || '—' })),
      cell('RTT', millis(l.rtt_ms)),
      cell('Since', timeEl(l.since))));
    replace('mesh-links', el('table', { class: 'grid mesh', attrs: { id: 'mesh-table' } },
      el('caption', { class: 'sr-only', text: 'Peer connections' }),
      el('thead', {}, el('tr', {}, ['A', 'B', 'Path', 'Address', 'RTT', 'Since'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, body)));
  }

  function renderSelectorError() {
    const box = $('filter-selector-error');
    box.textContent = state.selectorError ? `The selector does not parse: ${state.selectorError}` : '';
    box.hidden = !state.selectorError;
    $('filter-selector').setAttribute('aria-invalid', state.selectorError ? 'true' : 'false');
  }

  function renderSummary() {
    const s = state.inventory.summary;
    const f = state.inventory.fallback;
    const card = (key, label, value, apply, cls) => el('button', {
      class: `counter ${cls || ''}`,
      attrs: { type: 'button', title: apply ? `Show ${label.toLowerCase()}` : label },
      data: { counter: key },
      on: { click: apply || (() => {}) },
    }, el('span', { class: 'count', text: f && ['online', 'degraded', 'stale', 'offline', 'connected'].includes(key) ? '—' : String(value) }), el('span', { class: 'label', text: label }));
    // Counters count the devices the selector matches: they keep it.
    const filter = (presence, trust) => () => setFilters({ ...state.filters, presence, trust, text: '' });
    replace('summary',
      card('devices', 'Devices', s.devices, filter('', '')),
      card('online', 'Online', s.online, filter('online', ''), 'c-online'),
      card('degraded', 'Degraded', s.degraded, filter('degraded', ''), 'c-degraded'),
      card('stale', 'Stale', s.stale, filter('stale', ''), 'c-stale'),
      card('offline', 'Offline', s.offline, filter('offline', ''), 'c-offline'),
      card('connected', 'Connected', s.connected, null),
      card('trusted', 'Trusted', s.trusted, filter('', 'trusted'), 'c-trusted'),
      card('revoked', 'Revoked', s.revoked, filter('', 'revoked'), 'c-revoked'),
      card('pending_pairings', 'Pending pairings', s.pending_pairings, () => { location.hash = '#/pairing'; }, s.pending_pairings ? 'c-pending' : ''),
      card('with_warnings', 'With warnings', s.with_warnings, null, s.with_warnings ? 'c-warn' : ''));
  }

  function setFilters(f) {
    const selectorChanged = f.selector !== state.filters.selector;
    const typed = selectorChanged || f.text !== state.filters.text;
    state.filters = f;
    state.inventoryPage = 0;
    for (const [id, v] of [['filter-presence', f.presence], ['filter-trust', f.trust], ['filter-text', f.text], ['filter-selector', f.selector]]) {
      if ($(id).value !== v) $(id).value = v;
    }
    if (selectorChanged) renderBatchCard();
    // The anchor filters: ask it, once typing pauses.
    scheduleRefresh(typed ? SELECTOR_DEBOUNCE_MS : 0);
  }

  function setPage(page) {
    state.inventoryPage = Math.max(0, page);
    scheduleRefresh(0);
  }

  function capabilitySummary(c) {
    if (!c || !c.total) return el('span', { class: 'muted', text: '—' });
    return el('span', {}, `${c.available}/${c.total} available`,
      c.unavailable ? el('span', { class: 'badge warn', text: `${c.unavailable} unavailable` }) : null);
  }

  /** Problems first: offline, stale, degraded, then any warning, then the rest. Ranks change
   * only when presence or a warning does, so rows keep their place while heartbeats tick. */
  function problemRank(d) {
    const i = ['offline', 'stale', 'degraded'].indexOf(d.presence);
    if (i >= 0) return i;
    return d.warnings.length ? 3 : 4;
  }

  const TRUST_ORDER = ['revoked', 'pending', 'unknown', 'removed', 'trusted'];

  /** The sortable columns: key → value to compare (null sorts last either way). */
  const SORT_KEYS = {
    name: (d) => (d.name || '').toLowerCase(),
    presence: (d) => PRESENCE_ORDER.indexOf(d.presence),
    heartbeat: (d) => d.heartbeat_age_ms,
    loss: (d) => d.loss_rate,
    rtt: (d) => d.rtt_ms,
    trust: (d) => TRUST_ORDER.indexOf(d.trust),
  };

  function byNameThenId(a, b) {
    return (a.name || '').localeCompare(b.name || '') || a.device_id.localeCompare(b.device_id);
  }

  function compareDevices(a, b) {
    const { key, dir } = state.sort;
    if (!key) return problemRank(a) - problemRank(b) || byNameThenId(a, b);
    const va = SORT_KEYS[key](a);
    const vb = SORT_KEYS[key](b);
    const na = va === null || va === undefined;
    const nb = vb === null || vb === undefined;
    if (na !== nb) return na ? 1 : -1;
    if (!na && va !== vb) return (va < vb ? -1 : 1) * dir;
    return byNameThenId(a, b);
  }

  function setSort(key) {
    state.sort = state.sort.key === key ? { key, dir: -state.sort.dir } : { key, dir: 1 };
    setPage(0);
  }

  function canSelect() {
    return can(PERM.invoke) || can(PERM.trust);
  }

  function renderInventoryTable() {
    if (state.selectorError) {
      replace('inventory-table', el('p', { class: 'empty', text: 'Fix the selector to see the devices it matches.' }));
      renderBulkBar();
      return;
    }
    const rows = state.inventory.devices;
    const page = state.inventory.page;
    const total = state.inventory.summary.devices;
    // A selected row shows its latest entry; a selection holds only devices still listed,
    // which only a whole listing can tell.
    for (const d of rows) if (state.selected.has(d.device_id)) state.selected.set(d.device_id, d);
    if (!narrowed() && page.offset === 0 && page.total <= rows.length) {
      const listed = new Set(rows.map((d) => d.device_id));
      for (const id of [...state.selected.keys()]) if (!listed.has(id)) state.selected.delete(id);
    }
    renderBulkBar();
    if (!rows.length && page.total > 0 && page.offset > 0) {
      // The page ran past the end (devices went away): show the last one.
      setPage(Math.ceil(page.total / PAGE_SIZE) - 1);
      return;
    }
    if (!total) {
      replace('inventory-table', state.inventorySelector
        ? el('p', { class: 'empty', text: `No device matches the selector ${state.inventorySelector}.` })
        : el('p', { class: 'empty' }, 'No devices yet. ', el('a', { attrs: { href: '#/pairing' }, text: 'Pair one.' })));
      return;
    }
    const selecting = canSelect();
    const cell = (label, ...content) => el('td', { data: { label } }, ...content);
    const body = rows.map((d) => el('tr', { data: { deviceId: d.device_id } },
      selecting ? el('td', { class: 'select', data: { label: 'Select' } }, el('input', {
        attrs: { type: 'checkbox', checked: state.selected.has(d.device_id), 'aria-label': `Select ${d.name || d.device_id}` },
        data: { select: d.device_id },
        on: {
          change: (e) => {
            if (e.target.checked) state.selected.set(d.device_id, d);
            else state.selected.delete(d.device_id);
            renderInventoryTable();
          },
        },
      })) : null,
      cell('Device',
        el('a', { class: 'device-name', attrs: { href: `#/device/${enc(d.device_id)}` }, text: d.name || '(unnamed)' }),
        el('div', { class: 'mono small muted device-id', text: d.device_id }),
        labelChips(d.labels)),
      cell('Presence', badge('presence', d.presence), d.connected ? el('span', { class: 'small muted', text: ' connected' }) : null),
      cell('Trust', badge('trust', d.trust)),
      cell('Heartbeat', ageEl(d.heartbeat_age_ms, state.inventoryAt)),
      cell('Loss', el('span', { class: d.loss_rate > 0.1 ? 'bad' : '', text: percent(d.loss_rate) })),
      cell('RTT', millis(d.rtt_ms)),
      cell('Capabilities', capabilitySummary(d.capabilities)),
      cell('Warnings', d.warnings.length ? el('span', { class: 'badges' }, d.warnings.map(warningBadge)) : el('span', { class: 'muted', text: 'none' }))));
    const header = (label, key) => {
      if (!key) return el('th', { attrs: { scope: 'col' }, text: label });
      const active = state.sort.key === key;
      const dir = active && state.sort.dir < 0 ? 'descending' : 'ascending';
      return el('th', { attrs: { scope: 'col', 'aria-sort': active ? dir : 'none' }, data: { sort: key } },
        button(`${label}${active ? (dir === 'ascending' ? ' ▲' : ' ▼') : ''}`, () => setSort(key), {
          class: 'sort',
          title: active ? 'Sorted; click to reverse' : `Sort by ${label.toLowerCase()}`,
        }));
    };
    const allShownSelected = rows.length > 0 && rows.every((d) => state.selected.has(d.device_id));
    const selectAll = selecting ? el('th', { class: 'select', attrs: { scope: 'col' } }, el('input', {
      attrs: { type: 'checkbox', id: 'select-all', checked: allShownSelected, 'aria-label': 'Select every device shown' },
      on: {
        change: (e) => {
          for (const d of rows) {
            if (e.target.checked) state.selected.set(d.device_id, d);
            else state.selected.delete(d.device_id);
          }
          renderInventoryTable();
        },
      },
    })) : null;
    const table = el('table', { class: 'grid inventory', attrs: { id: 'inventory' } },
      el('caption', { class: 'sr-only', text: state.sort.key ? 'Devices' : 'Devices, problems first' }),
      el('thead', {}, el('tr', {}, selectAll,
        header('Device', 'name'), header('Presence', 'presence'), header('Trust', 'trust'), header('Heartbeat', 'heartbeat'),
        header('Loss', 'loss'), header('RTT', 'rtt'), header('Capabilities'), header('Warnings'))),
      el('tbody', {}, body));
    const matched = state.inventorySelector ? ` the selector ${state.inventorySelector} matches` : '';
    replace('inventory-table', table,
      narrowed() ? el('p', { class: 'muted small', text: `${page.total} of the ${total} devices${matched} match the filters.` }) : null,
      pager(page),
      state.sort.key ? button('Problems first', () => { state.sort = { key: null, dir: 1 }; setPage(0); }, { class: 'secondary small', id: 'sort-reset' }) : null);
  }

  /** Previous and next, and which rows of how many these are; nothing when one page holds
   * every match. */
  function pager(page) {
    if (page.offset === 0 && page.total <= PAGE_SIZE) return null;
    const first = Math.min(page.offset + 1, page.total);
    const last = Math.min(page.offset + PAGE_SIZE, page.total);
    const current = Math.floor(page.offset / PAGE_SIZE);
    const pages = Math.max(1, Math.ceil(page.total / PAGE_SIZE));
    return el('nav', { class: 'pager', attrs: { id: 'inventory-pager', 'aria-label': 'Inventory pages' } },
      button('← Previous', () => setPage(current - 1), { class: 'secondary small', id: 'page-prev', disabled: current === 0 }),
      el('span', { class: 'muted small', attrs: { id: 'page-status', role: 'status' }, text: `${first}–${last} of ${page.total} (page ${current + 1} of ${pages})` }),
      button('Next →', () => setPage(current + 1), { class: 'secondary small', id: 'page-next', disabled: last >= page.total }));
  }

  // ---------------------------------------------------------------------------------------
  // Bulk actions on the selected rows

  function selectedDevices() {
    if (!state.inventory) return [];
    return [...state.selected.values()];
  }

  function renderBulkBar() {
    const bar = $('bulk-bar');
    const chosen = selectedDevices();
    bar.hidden = !canSelect() || !state.inventory || state.inventory.fallback || !chosen.length;
    if (bar.hidden) return;
    const trusted = chosen.filter((d) => d.trust === 'trusted');
    const revocable = chosen.filter((d) => d.actions.includes('revoke'));
    $('bulk-count').textContent = `${chosen.length} selected`;
    const invoke = $('bulk-invoke');
    invoke.hidden = !(can(PERM.invoke) && can(PERM.read));
    invoke.disabled = !trusted.length;
    invoke.textContent = trusted.length === chosen.length ? 'Invoke on selected' : `Invoke on the ${trusted.length} trusted`;
    $('bulk-capability-label').hidden = invoke.hidden;
    const revoke = $('bulk-revoke');
    revoke.hidden = !can(PERM.trust);
    revoke.disabled = !revocable.length;
    revoke.textContent = revocable.length === chosen.length ? 'Revoke selected…' : `Revoke the ${revocable.length} trusted…`;
  }

  async function bulkInvoke(ev) {
    ev.preventDefault();
    const error = $('bulk-error');
    error.hidden = true;
    const targets = selectedDevices().filter((d) => d.trust === 'trusted');
    const capability = $('bulk-capability').value.trim();
    if (!targets.length) return;
    if (!capability) {
      error.textContent = 'Name the capability to run.';
      error.hidden = false;
      $('bulk-capability').focus();
      return;
    }
    const btn = $('bulk-invoke');
    btn.disabled = true;
    try {
      const body = { selector: '', devices: targets.map((d) => d.device_id), capability, input: null, timeout_ms: 30000 };
      const batch = (await api('POST', '/batches', body)).data;
      state.batch = batch;
      state.selected.clear();
      location.hash = `#/batch/${enc(batch.batch_id)}`;
    } catch (err) {
      error.textContent = describe(err);
      error.hidden = false;
    } finally {
      renderBulkBar();
    }
  }

  async function bulkRevoke() {
    const targets = selectedDevices().filter((d) => d.actions.includes('revoke'));
    if (!targets.length) return;
    const names = targets.map((d) => d.name || d.device_id);
    const answer = await confirmDialog({
      title: `Revoke ${targets.length} device${targets.length === 1 ? '' : 's'}?`,
      message: `Their connections close now and their certificates are refused from now on: ${names.join(', ')}.`,
      ok: `Revoke ${targets.length}`,
      reason: true,
    });
    if (!answer.ok) return;
    const failed = [];
    for (const d of targets) {
      try {
        await api('POST', `/devices/${enc(d.device_id)}/revoke`, { reason: answer.reason || null });
        state.selected.delete(d.device_id);
      } catch (err) {
        failed.push(`${d.name || d.device_id}: ${describe(err)}`);
      }
    }
    if (failed.length) banner(`Not revoked: ${failed.join('; ')}`, 'error', 'bulk');
    else banner(`${targets.length} device${targets.length === 1 ? ' is' : 's are'} revoked.`, 'success', 'bulk');
    scheduleRefresh(0);
  }

  // ---------------------------------------------------------------------------------------
  // Batches: one capability on the devices the inventory's selector matches

  /** How many devices a batch created now would cover: the trusted ones among those the
   * selector matched (online or not), or null while the inventory shown is not the
   * selector's. */
  function batchTargets() {
    if (!state.inventory || state.selectorError) return null;
    if (state.inventorySelector !== state.filters.selector.trim()) return null;
    return state.inventory.summary.trusted;
  }

  function renderBatchCard() {
    const card = $('batch-card');
    // Following a batch needs observability.read; an anchor without the node runtime (the
    // fallback inventory) cannot run one.
    card.hidden = !(can(PERM.invoke) && can(PERM.read) && state.inventory && !state.inventory.fallback);
    if (card.hidden) return;
    const n = batchTargets();
    const btn = $('batch-submit');
    btn.disabled = state.batchSubmitting || !n;
    if (n === null) btn.textContent = state.selectorError ? 'Run' : 'Run (reading the selector…)';
    else if (n === 0) btn.textContent = 'No trusted device matches';
    else if (!state.inventorySelector) btn.textContent = `Run on every device (${n})`;
    else btn.textContent = `Run on ${n} device${n === 1 ? '' : 's'}`;
  }

  async function submitBatch(ev) {
    ev.preventDefault();
    const error = $('batch-error');
    error.hidden = true;
    const fail = (text, field) => {
      error.textContent = text;
      error.hidden = false;
      if (field) field.focus();
    };
    const targets = batchTargets();
    if (!targets) return;
    const selector = state.inventorySelector;
    const capability = $('batch-capability').value.trim();
    if (!capability) return fail('Name the capability to run.', $('batch-capability'));
    let input = null;
    const raw = $('batch-input').value.trim();
    if (raw) {
      try {
        input = JSON.parse(raw);
      } catch (e) {
        return fail(`The input is not valid JSON: ${e.message}`, $('batch-input'));
      }
    }
    const timeoutS = Number($('batch-timeout').value) || 30;
    const concurrency = $('batch-concurrency').value.trim();
    const maxConcurrency = concurrency === '' ? null : Number(concurrency);
    if (maxConcurrency !== null && !(Number.isInteger(maxConcurrency) && maxConcurrency >= 1)) {
      return fail('At most at once: a whole number from 1, or empty for all at once.', $('batch-concurrency'));
    }
    if (!selector) {
      const answer = await confirmDialog({
        title: `Run ${capability} on every device?`,
        message: `No selector is set: this runs ${capability} on all ${targets} trusted devices.`,
        ok: 'Run on all',
      });
      if (!answer.ok) return;
    }
    state.batchSubmitting = true;
    renderBatchCard();
    try {
      const body = { selector, capability, input, timeout_ms: Math.round(timeoutS * 1000), max_concurrency: maxConcurrency };
      const batch = (await api('POST', '/batches', body)).data;
      state.batch = batch;
      location.hash = `#/batch/${enc(batch.batch_id)}`;
    } catch (err) {
      fail(describe(err));
    } finally {
      state.batchSubmitting = false;
      renderBatchCard();
    }
  }

  async function loadBatches() {
    if (!can(PERM.read)) {
      replace('batch-list', notice('This token cannot read batches: it lacks observability.read.', 'warn'));
      return;
    }
    const list = await get('/batches?limit=50');
    state.batchesRunning = list.some((b) => !b.done);
    if (!list.length) {
      replace('batch-list', el('p', { class: 'empty' }, 'No batches yet. Run one from the ', el('a', { attrs: { href: '#/inventory' }, text: 'inventory' }), '.'));
      return;
    }
    replace('batch-list', el('table', { class: 'grid batches', attrs: { id: 'batches' } },
      el('thead', {}, el('tr', {}, ['Created', 'Capability', 'Selector', 'Progress', 'Results', 'By'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, list.map((b) => el('tr', { data: { batchId: b.batch_id, done: String(b.done) } },
        el('td', { data: { label: 'Created' } }, timeEl(b.created_at)),
        el('td', { data: { label: 'Capability' } }, el('a', { class: 'mono batch-link', attrs: { href: `#/batch/${enc(b.batch_id)}` }, text: b.capability })),
        el('td', { data: { label: 'Selector' } }, selectorText(b.selector)),
        el('td', { data: { label: 'Progress' } }, progressBar(b, true)),
        el('td', { data: { label: 'Results' } }, resultBadges(b)),
        el('td', { data: { label: 'By' }, text: b.requested_by }))))));
  }

  function selectorText(selector) {
    return selector ? el('code', { class: 'wrap', text: selector }) : el('span', { class: 'muted', text: 'every device' });
  }

  /** The counts that are not zero, as badges (`2 succeeded`, `1 timed out`). */
  function resultBadges(b) {
    const parts = [['succeeded', 'succeeded', b.succeeded], ['failed', 'failed', b.failed], ['timed_out', 'timed out', b.timed_out],
      ['rejected', 'rejected', b.rejected], ['pending', 'pending', b.pending]]
      .filter(([, , n]) => n > 0)
      // Pending ones look like queued invocations.
      .map(([k, label, n]) => el('span', { class: `badge inv-${k === 'pending' ? 'queued' : k}`, data: { count: k }, text: `${n} ${label}` }));
    return parts.length ? el('span', { class: 'badges' }, parts) : el('span', { class: 'muted', text: 'no device' });
  }

  /** A bar with one segment per outcome, sized with the CSSOM (no inline style attribute,
   * which the page's CSP refuses). */
  function progressBar(b, small) {
    const finished = b.total - b.pending;
    const bar = el('div', {
      class: `bar${small ? ' small' : ''}`,
      attrs: { role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': b.total, 'aria-valuenow': finished, 'aria-label': `${finished} of ${b.total} finished` },
    });
    for (const [k, n] of [['succeeded', b.succeeded], ['failed', b.failed], ['timed_out', b.timed_out], ['rejected', b.rejected]]) {
      if (!n) continue;
      const seg = el('span', { class: `seg seg-${k}` });
      seg.style.width = `${(100 * n) / b.total}%`;
      bar.append(seg);
    }
    return el('div', { class: 'progress' }, bar, el('span', { class: 'progress-text small', text: `${finished}/${b.total}${b.done ? '' : ' …'}` }));
  }

  async function loadBatch(id) {
    if (!can(PERM.read)) {
      replace('batch-body', notice('This token cannot read batches: it lacks observability.read.', 'warn'));
      return;
    }
    let batch;
    try {
      batch = await get(`/batches/${enc(id)}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        state.batch = null;
        replace('batch-body', el('h1', { text: 'No such batch' }), notice(`${err.code}: ${err.message}`, 'warn'));
        return;
      }
      throw err;
    }
    if (state.route.view !== 'batch' || state.route.id !== id) return;
    state.batch = batch;
    renderBatch(batch);
  }

  function renderBatch(b) {
    if (!$('batch-head') || $('batch-body').dataset.batchId !== b.batch_id) {
      $('batch-body').dataset.batchId = b.batch_id;
      replace('batch-body', ['batch-head', 'batch-counts', 'batch-devices'].map((id) => el('div', { attrs: { id } })));
    }
    replace('batch-head', el('div', { class: 'device-head' },
      el('h1', { attrs: { id: 'batch-title' } }, el('span', { class: 'mono', text: b.capability }), ' on ', b.selector ? el('code', { text: b.selector }) : 'every device'),
      el('dl', { class: 'facts' },
        fact('Batch', b.batch_id, 'mono'),
        fact('Requested by', b.requested_by),
        fact('Created', timeEl(b.created_at)),
        fact('Deadline', el('span', {}, timeEl(b.deadline_at), ` (${absolute(b.deadline_at)})`)),
        fact('At most at once', b.max_concurrency ? String(b.max_concurrency) : 'all at once'))));
    renderBatchCounts(b);
    renderBatchDevices(b);
  }

  function renderBatchCounts(b) {
    if (!$('batch-counts')) return;
    const finished = b.total - b.pending;
    const counter = (key, label, value, cls) => el('div', { class: `counter ${cls}`, data: { count: key } },
      el('span', { class: 'count', text: String(value) }), el('span', { class: 'label', text: label }));
    replace('batch-counts', el('div', { class: 'card' },
      el('p', { class: 'batch-status', attrs: { id: 'batch-status', role: 'status' } },
        el('strong', { text: b.done ? 'Done' : 'Running' }), ` — ${finished} of ${b.total} device${b.total === 1 ? '' : 's'} finished`),
      progressBar(b, false),
      el('div', { class: 'summary batch-summary' },
        counter('total', 'Devices', b.total, ''),
        counter('succeeded', 'Succeeded', b.succeeded, 'c-online'),
        counter('failed', 'Failed', b.failed, b.failed ? 'c-revoked' : ''),
        counter('timed_out', 'Timed out', b.timed_out, b.timed_out ? 'c-warn' : ''),
        counter('rejected', 'Rejected', b.rejected, b.rejected ? 'c-revoked' : ''),
        counter('pending', 'Pending', b.pending, b.pending ? 'c-pending' : ''))));
  }

  /** One row per device, replaced only when its state changes (an open output stays open). */
  function renderBatchDevices(b) {
    const box = $('batch-devices');
    if (!box || !b.invocations) return;
    if (!b.invocations.length) {
      replace(box, el('p', { class: 'empty', text: 'The selector matched no trusted device.' }));
      return;
    }
    let table = $('batch-invocations');
    if (!table || table.dataset.batchId !== b.batch_id) {
      table = el('table', { class: 'grid', attrs: { id: 'batch-invocations' }, data: { batchId: b.batch_id } },
        el('thead', {}, el('tr', {}, ['Device', 'State', 'Output or error'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
        el('tbody'));
      replace(box, el('div', { class: 'card' }, el('h2', { text: 'Devices' }), table));
    }
    const tbody = table.tBodies[0];
    b.invocations.forEach((inv, i) => {
      const row = tbody.rows[i];
      if (row && row.dataset.invocationId === inv.invocation_id && row.dataset.state === inv.state) return;
      const fresh = batchRow(inv);
      if (row) row.replaceWith(fresh);
      else tbody.append(fresh);
    });
  }

  function batchRow(inv) {
    return el('tr', { data: { deviceId: inv.device_id, invocationId: inv.invocation_id, state: inv.state } },
      el('td', { data: { label: 'Device' } },
        el('a', { class: 'device-name', attrs: { href: `#/device/${enc(inv.device_id)}` }, text: inv.name || '(unnamed)' }),
        el('div', { class: 'mono small muted device-id', text: inv.device_id })),
      el('td', { data: { label: 'State' } }, badge('inv', inv.state)),
      el('td', { data: { label: 'Output or error' }, class: 'batch-result' }, batchResult(inv)));
  }

  function batchResult(inv) {
    if (inv.error) return el('span', { class: 'bad', text: inv.error });
    if (inv.output === null || inv.output === undefined) return el('span', { class: 'muted', text: isFinal(inv.state) ? '—' : 'waiting' });
    const line = typeof inv.output === 'string' ? inv.output : JSON.stringify(inv.output);
    if (line.length <= INLINE_OUTPUT_CHARS) return el('code', { class: 'output-inline', text: line });
    return el('details', {}, el('summary', { class: 'mono small', text: `${line.slice(0, 80)}…` }),
      el('pre', { class: 'output', text: outputText(inv) }));
  }

  /** `key=value` of each label, operators' first, then the facts the node reported. */
  function labelPairs(labels) {
    const pairs = Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`);
    const reported = (p) => p.startsWith('node.anchorage/');
    return pairs.filter((p) => !reported(p)).concat(pairs.filter(reported));
  }

  function labelChips(labels) {
    const pairs = labelPairs(labels).filter((p) => !p.startsWith('node.anchorage/'));
    if (!pairs.length) return null;
    return el('div', { class: 'badges labels' }, pairs.map((p) => el('span', { class: 'badge label', text: p })));
  }

  function renderInstances() {
    const list = state.inventory.instances || [];
    if (!list.length) {
      replace('instances');
      return;
    }
    replace('instances', el('details', { class: 'card' },
      el('summary', {}, el('strong', { text: `Anchor${list.length > 1 ? 's' : ''}` }),
        ` — ${list.map((i) => `${i.kind} ${i.version} on ${i.listen}, ${i.connected_nodes} connected`).join('; ')}`),
      list.map((i) => el('dl', { class: 'facts' },
        fact('Version', i.version),
        fact('QUIC', i.listen, 'mono'),
        fact('Console', i.console, 'mono'),
        fact('Up since', timeEl(i.started_at)),
        fact('Connected nodes', String(i.connected_nodes)),
        fact('Store', `${(i.store_bytes / 1048576).toFixed(1)} MiB`),
        fact('CA fingerprint', i.ca_fingerprint, 'mono wrap'),
        fact('CA expires', timeEl(i.ca_expires_at)),
        i.warnings.length ? fact('Warnings', el('span', { class: 'badges' }, i.warnings.map(warningBadge))) : null))));
  }

  function fact(label, value, cls) {
    return [el('dt', { text: label }), el('dd', { class: cls || '' }, value === null || value === undefined || value === '' ? '—' : value)];
  }

  // ---------------------------------------------------------------------------------------
  // Device page

  async function fetchDevice(id) {
    try {
      return { d: await get(`/inventory/${enc(id)}`), fallback: null };
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 503) throw err;
      const dev = await get(`/devices/${enc(id)}`);
      const d = fallbackInventory([dev], []).devices[0];
      return { d, fallback: `Presence, registration and capabilities are not available (${err.code}: ${err.message}).` };
    }
  }

  async function fetchHistory(id) {
    try {
      return { h: await get(`/inventory/${enc(id)}/history?hours=${HISTORY_HOURS}`), note: null };
    } catch (err) {
      if (err instanceof ApiError && (err.status === 503 || err.status === 404)) return { h: null, note: `${err.code}: ${err.message}` };
      throw err;
    }
  }

  async function fetchInvocations(id) {
    try {
      return { list: await get(`/invocations?device_id=${enc(id)}&limit=20`), note: null };
    } catch (err) {
      if (err instanceof ApiError && err.status === 503) return { list: [], note: `${err.code}: ${err.message}` };
      throw err;
    }
  }

  async function loadDevice(id) {
    if (!can(PERM.read)) {
      replace('device-body', notice('This token cannot read devices: it lacks observability.read.', 'warn'));
      return;
    }
    let result;
    try {
      result = await fetchDevice(id);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        replace('device-body', el('h1', { text: 'No such device' }), notice(`${err.code}: ${err.message}`, 'warn'));
        return;
      }
      throw err;
    }
    const [invs, history] = await Promise.all([fetchInvocations(id), fetchHistory(id)]);
    if (state.route.view !== 'device' || state.route.id !== id) return;
    renderDevice(result.d, result.fallback, invs);
    replace('device-history', historyCard(history));
  }

  /** The device page's sections; the invoke card survives re-renders (an operator may be
   * typing in it while live updates arrive). */
  const DEVICE_SECTIONS = ['device-head', 'device-notice', 'device-actions', 'device-invoke', 'device-info', 'device-history', 'device-pending', 'device-caps', 'device-invocations'];

  function deviceSkeleton() {
    if ($('device-head')) return;
    replace('device-body', DEVICE_SECTIONS.map((id) => el('div', { attrs: { id } })));
  }

  function renderDevice(d, fallbackNote, invs) {
    deviceSkeleton();
    const fetchedAt = Date.now();
    const node = d.node;
    const dev = d.device;

    replace('device-head', el('div', { class: 'device-head' },
      el('h1', { attrs: { id: 'device-name' }, text: d.name || '(unnamed)' }),
      el('div', { class: 'badges' }, badge('presence', d.presence), badge('trust', d.trust), d.warnings.map(warningBadge)),
      el('div', { class: 'mono small muted wrap', attrs: { id: 'device-id' }, text: d.device_id })));
    replace('device-notice', fallbackNote && node === null ? notice(fallbackNote, 'info') : null);
    // Rebuilt only when what it offers changes, so text typed into it survives a refresh.
    const actionsKey = JSON.stringify([d.device_id, d.actions, can(PERM.trust), !!dev]);
    const actionsBox = $('device-actions');
    if (actionsBox.dataset.key !== actionsKey) {
      actionsBox.dataset.key = actionsKey;
      replace(actionsBox, deviceActions(d));
    }

    const caps = node ? node.capabilities : [];
    // Rebuilt only when what it offers changes.
    const invokeKey = JSON.stringify([d.device_id, d.actions.includes('invoke'), can(PERM.invoke), caps.map((c) => [c.name, c.available])]);
    const invokeBox = $('device-invoke');
    if (invokeBox.dataset.key !== invokeKey) {
      const keep = $('invoke-capability') ? $('invoke-capability').value : null;
      invokeBox.dataset.key = invokeKey;
      replace(invokeBox, invokeCard(d, caps));
      const select = $('invoke-capability');
      if (select && keep && [...select.options].some((o) => o.value === keep && !o.disabled)) select.value = keep;
      if (state.lastInvocation && state.lastInvocation.device_id === d.device_id) renderInvokeResult(state.lastInvocation);
    }

    const registration = el('div', { class: 'card' }, el('h2', { text: 'Registration' }),
      node ? el('dl', { class: 'facts' },
        fact('Platform', node.platform),
        fact('Agent', node.agent_version),
        fact('Connection', node.connected ? el('span', {}, 'open since ', timeEl(node.connected_since)) : 'closed'),
        fact('Remote address', node.remote_addr, 'mono'),
        fact('Last seen', timeEl(node.last_seen_at)),
        fact('Heartbeat', ageEl(node.heartbeat_age_ms, fetchedAt)),
        fact('Loss', percent(node.loss_rate)),
        fact('RTT', millis(node.rtt_ms)))
        : el('p', { class: 'muted', text: fallbackNote || 'This device has not registered as a node yet.' }));

    const cert = el('div', { class: 'card' }, el('h2', { text: 'Trust and certificate' }),
      dev ? el('dl', { class: 'facts' },
        fact('Trust', badge('trust', dev.trust)),
        // The registration shows the platform the node runs now; the one it paired with only
        // when it differs (or there is no registration).
        !node || node.platform !== dev.platform ? fact(node ? 'Platform at pairing' : 'Platform', dev.platform) : null,
        fact('Labels', labelPairs(dev.labels).join(', ') || null, 'mono wrap'),
        fact('Paired', timeEl(dev.paired_at)),
        fact('Certificate serial', dev.cert_serial, 'mono wrap'),
        fact('Valid from', absolute(dev.cert_not_before)),
        fact('Expires', el('span', {}, timeEl(dev.cert_expires_at), ` (${absolute(dev.cert_expires_at)})`)),
        fact('Rotation', dev.rotation_pending ? 'requested, waiting for the node' : 'none pending'),
        dev.revoked_at ? fact('Revoked', el('span', {}, timeEl(dev.revoked_at), dev.revoked_reason ? ` — ${dev.revoked_reason}` : '')) : null)
        : el('p', { class: 'muted', text: 'No certificate: this device has not completed pairing.' }));
    replace('device-info', el('div', { class: 'columns' }, registration, cert));

    replace('device-pending', d.pending_pairings && d.pending_pairings.length
      ? el('div', { class: 'card' }, el('h2', { text: 'Pairing requests waiting' }), requestTable(d.pending_pairings, true))
      : null);

    replace('device-caps', el('div', { class: 'card' }, el('h2', { text: 'Capabilities' }),
      caps.length ? el('table', { class: 'grid', attrs: { id: 'capabilities' } },
        el('thead', {}, el('tr', {}, ['Name', 'State', 'Description'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
        el('tbody', {}, caps.map((c) => el('tr', { data: { capability: c.name } },
          el('td', { data: { label: 'Name' }, class: 'mono', text: c.name }),
          el('td', { data: { label: 'State' } }, badge('cap', c.available ? 'available' : 'unavailable'), c.reason ? el('div', { class: 'small muted', text: c.reason }) : null),
          el('td', { data: { label: 'Description' }, text: c.description })))))
        : el('p', { class: 'muted', text: node ? 'This node offers no capabilities.' : '—' })));

    replace('device-invocations', invocationsCard(invs));
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    for (const c of children.flat()) if (c) node.append(c);
    return node;
  }

  /** A small line chart of `points` ([time ms, value]) between `from` and `to`, drawn as inline
   * SVG: one circle per sample (with its value as a tooltip), lines between them. */
  function chart(id, title, points, from, to, format) {
    const W = 300;
    const H = 64;
    const PAD = 4;
    const values = points.map((p) => p[1]);
    const max = Math.max(...values, 0) || 1;
    const x = (t) => PAD + ((t - from) / Math.max(1, to - from)) * (W - 2 * PAD);
    const y = (v) => H - PAD - (v / max) * (H - 2 * PAD);
    const last = points.length ? format(points[points.length - 1][1]) : '—';
    const pts = points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
    const drawing = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': `${title} over the last ${HISTORY_HOURS} hours, now ${last}`, preserveAspectRatio: 'none' },
      svg('line', { x1: 0, y1: H - PAD, x2: W, y2: H - PAD, class: 'axis' }),
      points.length > 1 ? svg('polyline', { points: pts, class: 'line' }) : null,
      points.map(([t, v]) => svg('circle', { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 1.8, class: 'pt' },
        svg('title', {}, document.createTextNode(`${absolute(new Date(t).toISOString())}: ${format(v)}`)))));
    return el('figure', { class: 'chart-box', attrs: { id } },
      el('figcaption', {}, el('strong', { text: title }), ' ', el('span', { class: 'muted small', text: points.length ? `now ${last}, peak ${format(max)}` : 'no samples' })),
      drawing);
  }

  /** When the device was in which presence: coloured bands, and the changes as a list. */
  function presenceTimeline(changes, from, to) {
    const W = 300;
    const H = 14;
    const x = (t) => ((Math.max(t, from) - from) / Math.max(1, to - from)) * W;
    const bands = changes.map((c, i) => {
      const start = parseTime(c.at);
      const end = i + 1 < changes.length ? parseTime(changes[i + 1].at) : to;
      return svg('rect', { x: x(start).toFixed(1), y: 0, width: Math.max(0.5, x(end) - x(start)).toFixed(1), height: H, class: `band presence-band-${c.presence}` },
        svg('title', {}, document.createTextNode(`${c.presence} from ${absolute(c.at)}`)));
    });
    return el('div', { class: 'timeline', attrs: { id: 'history-presence' } },
      el('strong', { text: 'Presence' }),
      svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'timeline-bar', role: 'img', 'aria-label': 'Presence over time', preserveAspectRatio: 'none' }, bands),
      changes.length
        ? el('ol', { class: 'changes small' }, changes.slice().reverse().slice(0, 12).map((c) => el('li', { data: { presence: c.presence } }, badge('presence', c.presence), ' ', timeEl(c.at), el('span', { class: 'muted', text: ` (${absolute(c.at)})` }))))
        : el('p', { class: 'muted small', text: 'No presence change recorded.' }));
  }

  function historyCard({ h, note }) {
    const head = el('h2', { text: `Last ${HISTORY_HOURS} hours` });
    if (!h) return el('div', { class: 'card' }, head, el('p', { class: 'muted', text: note || 'No history.' }));
    const from = parseTime(h.from);
    const to = parseTime(h.to);
    const series = (f) => h.samples.filter((s) => f(s) !== null && f(s) !== undefined).map((s) => [parseTime(s.at), f(s)]);
    return el('div', { class: 'card' }, head,
      el('p', { class: 'hint', text: `Sampled every ${span(h.interval_s * 1000)} while the node is connected to this anchor.` }),
      el('div', { class: 'charts' },
        chart('history-rtt', 'RTT', series((s) => s.rtt_ms), from, to, millis),
        chart('history-loss', 'Loss', series((s) => s.loss), from, to, percent),
        chart('history-heartbeat', 'Heartbeat age', series((s) => s.heartbeat_age_s), from, to, (v) => `${v.toFixed(1)} s`)),
      presenceTimeline(h.presence, from, to));
  }

  function deviceActions(d) {
    if (!can(PERM.trust)) return null;
    const allowed = (a) => d.actions.includes(a);
    const id = d.device_id;
    const name = d.name || id;
    return el('div', { class: 'card actions-card' }, el('h2', { text: 'Trust actions' }),
      el('div', { class: 'actions' },
        button('Rotate certificate', async (ev) => {
          await act(ev.currentTarget, () => api('POST', `/devices/${enc(id)}/rotate`), `Rotation requested for ${name}.`);
        }, { id: 'action-rotate', disabled: !allowed('rotate'), title: allowed('rotate') ? 'Ask the node for a new certificate' : 'Only a trusted device can rotate' }),
        button('Revoke…', async (ev) => {
          const answer = await confirmDialog({
            title: `Revoke ${name}?`,
            message: `The device's connection closes now and its certificate is refused from now on. To pair it again it must first be removed. Device ${id}.`,
            ok: 'Revoke',
            reason: true,
          });
          if (!answer.ok) return;
          await act(ev.currentTarget, () => api('POST', `/devices/${enc(id)}/revoke`, { reason: answer.reason || null }), `${name} is revoked.`);
        }, { class: 'danger', id: 'action-revoke', disabled: !allowed('revoke'), title: allowed('revoke') ? 'Revoke this device now' : 'Already revoked or not paired' }),
        button('Remove…', async (ev) => {
          const answer = await confirmDialog({
            title: `Remove ${name}?`,
            message: `The device's records (trust, registration, presence) are deleted and its certificate is refused. It can pair again with a new code. Device ${id}.`,
            ok: 'Remove',
          });
          if (!answer.ok) return;
          const ok = await act(ev.currentTarget, () => api('DELETE', `/devices/${enc(id)}`), `${name} was removed.`);
          if (ok) location.hash = '#/inventory';
        }, { class: 'danger', id: 'action-remove', disabled: !allowed('remove'), title: allowed('remove') ? 'Delete this device' : 'Revoke it first' })),
      d.device ? labelEditor(id, name) : null);
  }

  /** Set labels with `key=value`, remove them with `key-`, several at once. */
  function labelEditor(id, name) {
    const input = el('input', { attrs: { id: 'label-changes', type: 'text', placeholder: 'site=lab role-', autocomplete: 'off', 'aria-label': 'Label changes' } });
    return el('div', { class: 'actions label-editor' },
      input,
      button('Apply labels', async (ev) => {
        const set = {};
        const remove = [];
        for (const word of input.value.trim().split(/\s+/).filter(Boolean)) {
          const eq = word.indexOf('=');
          if (eq > 0) set[word.slice(0, eq)] = word.slice(eq + 1);
          else if (word.endsWith('-') && word.length > 1) remove.push(word.slice(0, -1));
          else {
            banner(`"${word}": write key=value to set a label, key- to remove one.`, 'error', 'action');
            return;
          }
        }
        const ok = await act(ev.currentTarget, () => api('PATCH', `/devices/${enc(id)}/labels`, { set, remove }), `Labels of ${name} changed.`);
        if (ok) input.value = '';
      }, { id: 'action-label', title: 'Set key=value, remove key-' }));
  }

  /** Runs an action with its button disabled; shows the outcome; re-reads the view. */
  async function act(btn, fn, success) {
    if (btn) btn.disabled = true;
    try {
      await fn();
      banner(success, 'success', 'action');
      scheduleRefresh(0);
      return true;
    } catch (err) {
      showError(err, 'action');
      return false;
    } finally {
      if (btn && btn.isConnected) btn.disabled = false;
    }
  }

  function invokeCard(d, caps) {
    if (!can(PERM.invoke)) return null;
    const options = caps.length
      ? caps.map((c) => el('option', { attrs: { value: c.name, disabled: !c.available }, text: c.available ? c.name : `${c.name} (unavailable)` }))
      : BUILTIN_CAPABILITIES.map((c) => el('option', { attrs: { value: c }, text: c }));
    const usable = d.actions.includes('invoke');
    const form = el('form', { class: 'invoke-form', attrs: { id: 'invoke-form' }, on: { submit: (ev) => { ev.preventDefault(); invoke(d.device_id); } } },
      el('label', {}, 'Capability', el('select', { attrs: { id: 'invoke-capability' } }, options)),
      el('label', { class: 'grow' }, 'Input (JSON)', el('textarea', { attrs: { id: 'invoke-input', rows: 3, spellcheck: 'false' }, text: '{}' })),
      el('label', {}, 'Timeout (s)', el('input', { attrs: { id: 'invoke-timeout', type: 'number', min: 1, max: 3600, value: 30 } })),
      el('div', { class: 'actions' }, el('button', { attrs: { type: 'submit', id: 'invoke-submit', disabled: !usable }, text: 'Invoke' })));
    return el('div', { class: 'card' }, el('h2', { text: 'Invoke' }),
      usable ? null : el('p', { class: 'muted', text: 'Only a trusted device can run capabilities.' }),
      form, el('p', { class: 'form-error', attrs: { id: 'invoke-error', role: 'alert', hidden: true } }),
      el('div', { attrs: { id: 'invoke-result', 'aria-live': 'polite' } }));
  }

  async function invoke(deviceId) {
    const error = $('invoke-error');
    error.hidden = true;
    let input;
    const raw = $('invoke-input').value.trim();
    try {
      input = raw === '' ? null : JSON.parse(raw);
    } catch (e) {
      error.textContent = `The input is not valid JSON: ${e.message}`;
      error.hidden = false;
      $('invoke-input').focus();
      return;
    }
    const timeoutS = Number($('invoke-timeout').value) || 30;
    const body = { capability: $('invoke-capability').value, input, timeout_ms: Math.round(timeoutS * 1000), async: false };
    const submit = $('invoke-submit');
    submit.disabled = true;
    replace('invoke-result', el('p', { class: 'muted', text: `Running ${body.capability}…` }));
    try {
      let inv = (await api('POST', `/nodes/${enc(deviceId)}/invoke`, body)).data;
      state.lastInvocation = inv;
      renderInvokeResult(inv);
      // 202: still running at the deadline of the request; follow it.
      while (!isFinal(inv.state) && state.route.id === deviceId) {
        await new Promise((r) => setTimeout(r, 1000));
        inv = await get(`/invocations/${enc(inv.invocation_id)}`);
        state.lastInvocation = inv;
        renderInvokeResult(inv);
      }
      scheduleRefresh();
    } catch (err) {
      replace('invoke-result');
      error.textContent = describe(err);
      error.hidden = false;
    } finally {
      if ($('invoke-submit')) $('invoke-submit').disabled = false;
    }
  }

  function isFinal(s) {
    return s !== 'queued' && s !== 'dispatched';
  }

  function outputText(inv) {
    if (inv.output === null || inv.output === undefined) return null;
    return typeof inv.output === 'string' ? inv.output : JSON.stringify(inv.output, null, 2);
  }

  function renderInvokeResult(inv) {
    const box = $('invoke-result');
    if (!box) return;
    const out = outputText(inv);
    replace(box, el('div', { class: `result result-${inv.state}`, data: { invocationId: inv.invocation_id, state: inv.state } },
      el('div', { class: 'result-head' },
        el('span', { class: 'mono', text: inv.capability }), badge('inv', inv.state),
        inv.duration_ms !== null && inv.duration_ms !== undefined ? el('span', { class: 'muted small', text: `${inv.duration_ms} ms on the node` }) : null,
        inv.truncated ? el('span', { class: 'badge warn', text: 'output truncated' }) : null),
      inv.error ? el('p', { class: 'bad', attrs: { id: 'invoke-error-text' }, text: inv.error }) : null,
      out !== null ? el('pre', { class: 'output', attrs: { id: 'invoke-output', tabindex: 0 }, text: out }) : null));
  }

  function invocationsCard(invs) {
    const card = el('div', { class: 'card' }, el('h2', { text: 'Recent invocations' }));
    if (invs.note) {
      card.append(el('p', { class: 'muted', text: `Invocations are not available: ${invs.note}` }));
      return card;
    }
    if (!invs.list.length) {
      card.append(el('p', { class: 'muted', text: 'None yet.' }));
      return card;
    }
    card.append(el('table', { class: 'grid', attrs: { id: 'invocations' } },
      el('thead', {}, el('tr', {}, ['When', 'Capability', 'State', 'Took', 'By', 'Output'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, invs.list.map((i) => {
        const out = outputText(i);
        const detail = i.error || out;
        return el('tr', { data: { invocationId: i.invocation_id } },
          el('td', { data: { label: 'When' } }, timeEl(i.created_at)),
          el('td', { data: { label: 'Capability' }, class: 'mono', text: i.capability }),
          el('td', { data: { label: 'State' } }, badge('inv', i.state)),
          el('td', { data: { label: 'Took' }, text: i.duration_ms === null || i.duration_ms === undefined ? '—' : `${i.duration_ms} ms` }),
          el('td', { data: { label: 'By' }, text: i.requested_by }),
          el('td', { data: { label: 'Output' } }, detail
            ? el('details', {}, el('summary', { text: i.error ? 'error' : 'output' }), el('pre', { class: 'output', text: i.error ? i.error : out }))
            : el('span', { class: 'muted', text: '—' })));
      }))));
    return card;
  }

  // ---------------------------------------------------------------------------------------
  // Pairing

  async function loadPairing() {
    if (!state.inventory && can(PERM.read)) {
      // For the anchor's address in the pairing command; not worth an error if it fails.
      try {
        state.inventory = (await fetchInventory()).inv;
      } catch (_) {
        // Shown as ANCHOR-HOST.
      }
    }
    renderMinted();
    if (!can(PERM.read)) {
      replace('pending-requests', notice('This token cannot list pairing requests: it lacks observability.read.', 'warn'));
      replace('decided-requests');
      replace('codes');
      return;
    }
    const [requests, codes] = await Promise.all([get('/pairing/requests'), get('/pairing/codes')]);
    const pending = requests.filter((r) => r.state === 'pending_approval');
    const decided = requests.filter((r) => r.state !== 'pending_approval').slice(0, 20);
    replace('pending-requests', pending.length ? requestTable(pending, true) : el('p', { class: 'muted', text: 'No device is waiting.' }));
    replace('decided-requests', decided.length ? requestTable(decided, false) : el('p', { class: 'muted', text: 'No decisions yet.' }));
    replace('codes', codes.length ? codeTable(codes.slice(0, 20)) : el('p', { class: 'muted', text: 'No codes minted yet.' }));
  }

  function requestTable(list, pending) {
    const cols = pending
      ? ['Device', 'Platform', 'Code to compare', 'Asked', 'Expires', 'Decision']
      : ['Device', 'Platform', 'State', 'Decided by', 'When', 'Reason'];
    return el('table', { class: `grid requests ${pending ? 'pending' : 'decided'}` },
      el('thead', {}, el('tr', {}, cols.map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, list.map((r) => el('tr', { data: { requestId: r.request_id, deviceId: r.device_id } },
        el('td', { data: { label: 'Device' } },
          el('a', { attrs: { href: `#/device/${enc(r.device_id)}` }, text: r.device_name || '(unnamed)' }),
          el('div', { class: 'mono small muted', text: r.device_id })),
        el('td', { data: { label: 'Platform' }, text: r.platform }),
        ...(pending ? [
          el('td', { data: { label: 'Code to compare' } }, el('span', { class: 'sas', text: r.sas })),
          el('td', { data: { label: 'Asked' } }, timeEl(r.requested_at)),
          el('td', { data: { label: 'Expires' } }, timeEl(r.expires_at)),
          el('td', { data: { label: 'Decision' } }, can(PERM.trust) ? el('div', { class: 'actions' },
            button('Approve', (ev) => act(ev.currentTarget, () => api('POST', `/pairing/requests/${enc(r.request_id)}/approve`), `Approved ${r.device_name}.`), { class: 'approve', ariaLabel: `Approve ${r.device_name}` }),
            button('Reject…', async (ev) => {
              const answer = await confirmDialog({ title: `Reject ${r.device_name}?`, message: `The device is told it was refused. Request ${r.request_id}.`, ok: 'Reject', reason: true });
              if (answer.ok) await act(ev.currentTarget, () => api('POST', `/pairing/requests/${enc(r.request_id)}/reject`, { reason: answer.reason || null }), `Rejected ${r.device_name}.`);
            }, { class: 'danger', ariaLabel: `Reject ${r.device_name}` }))
            : el('span', { class: 'muted', text: 'needs trust.operate' })),
        ] : [
          el('td', { data: { label: 'State' } }, badge('req', r.state)),
          el('td', { data: { label: 'Decided by' }, text: r.decided_by || '—' }),
          el('td', { data: { label: 'When' } }, timeEl(r.decided_at || r.requested_at)),
          el('td', { data: { label: 'Reason' }, text: r.reason || '—' }),
        ])))));
  }

  function codeTable(codes) {
    return el('table', { class: 'grid codes' },
      el('thead', {}, el('tr', {}, ['Code id', 'Method', 'State', 'Wrong tries', 'Minted', 'Expires', 'By'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, codes.map((c) => el('tr', { data: { codeId: c.code_id } },
        el('td', { data: { label: 'Code id' }, class: 'mono', text: c.code_id }),
        el('td', { data: { label: 'Method' }, text: c.method.toUpperCase() }),
        el('td', { data: { label: 'State' } }, badge('code', c.state)),
        el('td', { data: { label: 'Wrong tries' }, text: String(c.failed_attempts) }),
        el('td', { data: { label: 'Minted' } }, timeEl(c.created_at)),
        el('td', { data: { label: 'Expires' } }, timeEl(c.expires_at)),
        el('td', { data: { label: 'By' }, text: c.created_by })))));
  }

  async function mint(ev) {
    ev.preventDefault();
    const btn = $('mint-submit');
    btn.disabled = true;
    try {
      const body = { method: $('mint-method').value, ttl_secs: Number($('mint-ttl').value) };
      const minted = (await api('POST', '/pairing/codes', body)).data;
      if (state.mintedQrUrl) URL.revokeObjectURL(state.mintedQrUrl);
      state.mintedQrUrl = null;
      state.minted = minted;
      if (minted.uri) {
        const blob = (await api('GET', `/qr?text=${enc(minted.uri)}`)).data;
        state.mintedQrUrl = URL.createObjectURL(blob);
      }
      renderMinted();
      scheduleRefresh(0);
    } catch (err) {
      showError(err, 'action');
    } finally {
      btn.disabled = false;
    }
  }

  /** The anchor's QUIC address as a node should dial it (a wildcard listen address becomes the
   * host this page was loaded from). */
  function quicAddress() {
    const inst = state.inventory && state.inventory.instances && state.inventory.instances[0];
    if (!inst || !inst.listen) return 'ANCHOR-HOST:7444';
    const m = /^(.*):(\d+)$/.exec(inst.listen);
    if (!m) return inst.listen;
    const wildcard = m[1] === '0.0.0.0' || m[1] === '[::]' || m[1] === '::';
    return wildcard ? `${location.hostname}:${m[2]}` : inst.listen;
  }

  /** A shell command with a button that copies it. */
  function commandBlock(text) {
    const pre = el('pre', { class: 'command', attrs: { id: 'pair-command' }, text });
    const copy = button('Copy', async (ev) => {
      const btn = ev.currentTarget;
      let ok = false;
      try {
        await navigator.clipboard.writeText(text);
        ok = true;
      } catch (_) {
        // No clipboard API (a plain-HTTP page on another host): select the text instead.
        const range = document.createRange();
        range.selectNodeContents(pre);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        ok = document.execCommand && document.execCommand('copy');
      }
      btn.textContent = ok ? 'Copied' : 'Selected: press Ctrl+C';
      setTimeout(() => { btn.textContent = 'Copy'; }, 2000);
    }, { class: 'secondary small', id: 'copy-command', ariaLabel: 'Copy the pairing command' });
    return el('div', { class: 'command-block' }, pre, copy);
  }

  function renderMinted() {
    const m = state.minted;
    if (!m || !can(PERM.trust)) {
      replace('minted');
      return;
    }
    const expires = parseTime(m.expires_at);
    const anchorAddr = quicAddress();
    const parts = m.method === 'qr'
      ? [
        state.mintedQrUrl ? el('img', { class: 'qr', attrs: { id: 'minted-qr', src: state.mintedQrUrl, alt: 'QR code of the pairing URI' } }) : null,
        el('p', {}, 'Scan it, or on the device run:'),
        commandBlock(`anchor-node pair --qr '${m.uri}'`),
      ]
      : [
        el('div', { class: 'pin', attrs: { id: 'minted-code', 'aria-label': 'Pairing PIN' }, text: m.code }),
        el('p', {}, 'On the device run:'),
        commandBlock(`anchor-node pair --anchor ${anchorAddr} --code ${m.code}`),
      ];
    replace('minted', el('div', { class: 'minted', data: { codeId: m.code_id } },
      ...parts,
      el('p', { class: 'muted' }, `Code ${m.code_id}, single use, `, el('span', { class: 'countdown', data: { expires: String(expires) }, text: `expires in ${span(expires - Date.now())}` }), '. It is shown only now.'),
      button('Hide code', () => {
        state.minted = null;
        renderMinted();
      }, { class: 'secondary small' })));
  }

  // ---------------------------------------------------------------------------------------
  // Audit log

  async function loadAudit() {
    if (!can(PERM.read)) {
      replace('audit-list', notice('This token cannot read the audit log: it lacks observability.read.', 'warn'));
      return;
    }
    const q = new URLSearchParams({ limit: '200' });
    for (const [key, id] of [['target', 'audit-target'], ['actor', 'audit-actor'], ['action', 'audit-action']]) {
      const v = $(id).value.trim();
      if (v) q.set(key, v);
    }
    for (const [key, id] of [['since', 'audit-since'], ['until', 'audit-until']]) {
      const v = $(id).value;
      const t = v ? Date.parse(v) : NaN;
      if (!Number.isNaN(t)) q.set(key, new Date(t).toISOString());
    }
    const entries = await get(`/audit?${q}`);
    if (state.route.view !== 'audit') return;
    const filtered = [...q.keys()].some((k) => k !== 'limit');
    if (!entries.length) {
      replace('audit-list', el('p', { class: 'empty', text: filtered ? 'No entry matches the filters.' : 'Nothing audited yet.' }));
      return;
    }
    const targetCell = (v) => {
      // A device id links to its page.
      if (/^[a-z2-7]{52}$/.test(v) || (state.inventory && state.inventory.devices.some((d) => d.device_id === v))) {
        return el('a', { class: 'mono small wrap', attrs: { href: `#/device/${enc(v)}` }, text: v });
      }
      return el('span', { class: 'mono small wrap', text: v });
    };
    replace('audit-list', el('table', { class: 'grid audit', attrs: { id: 'audit' } },
      el('thead', {}, el('tr', {}, ['When', 'Actor', 'Action', 'Target', 'Detail'].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, entries.map((e) => el('tr', { data: { action: e.action, target: e.target } },
        el('td', { data: { label: 'When' }, class: 'nowrap' }, timeEl(e.at), el('div', { class: 'muted small', text: absolute(e.at) })),
        el('td', { data: { label: 'Actor' }, text: e.actor }),
        el('td', { data: { label: 'Action' }, class: 'mono', text: e.action }),
        el('td', { data: { label: 'Target' } }, e.target ? targetCell(e.target) : el('span', { class: 'muted', text: '—' })),
        el('td', { data: { label: 'Detail' }, class: 'wrap', text: e.detail || '' }))))),
    entries.length === 200 ? el('p', { class: 'muted small', text: 'The newest 200 entries; narrow the filters to see older ones.' }) : null);
  }

  // ---------------------------------------------------------------------------------------
  // Tokens

  async function loadTokens() {
    if (!can(PERM.tokens)) {
      replace('token-list', notice('This token cannot manage tokens: it lacks tokens.manage.', 'warn'));
      $('token-form').hidden = true;
      return;
    }
    $('token-form').hidden = false;
    const tokens = await get('/tokens');
    replace('token-list', el('table', { class: 'grid tokens', attrs: { id: 'tokens' } },
      el('thead', {}, el('tr', {}, ['Name', 'Id', 'Permissions', 'Limits', 'Expires', 'Last used', 'Created', 'By', 'State', ''].map((h) => el('th', { attrs: { scope: 'col' }, text: h })))),
      el('tbody', {}, tokens.map((t) => {
        const self = state.me && t.id === state.me.token_id;
        const expires = parseTime(t.expires_at);
        const expired = expires !== null && expires <= Date.now();
        return el('tr', { data: { tokenId: t.id } },
          el('td', { data: { label: 'Name' } }, t.name, self ? el('span', { class: 'badge info', text: 'this session' }) : null),
          el('td', { data: { label: 'Id' }, class: 'mono small', text: t.id }),
          el('td', { data: { label: 'Permissions' } }, el('span', { class: 'badges' }, t.permissions.map((p) => el('span', { class: 'badge perm', text: p })))),
          el('td', { data: { label: 'Limits' }, class: 'token-limits' }, limitsEl(t.scope)),
          el('td', { data: { label: 'Expires' }, class: 'token-expires' }, expires === null ? el('span', { class: 'muted', text: 'never' }) : timeEl(t.expires_at)),
          el('td', { data: { label: 'Last used' }, class: 'token-used' }, t.last_used_at ? timeEl(t.last_used_at) : el('span', { class: 'muted', text: 'never' })),
          el('td', { data: { label: 'Created' } }, timeEl(t.created_at)),
          el('td', { data: { label: 'By' }, text: t.created_by }),
          el('td', { data: { label: 'State' } }, t.revoked_at
            ? el('span', {}, badge('token', 'revoked'), ' ', timeEl(t.revoked_at))
            : badge('token', expired ? 'expired' : 'active')),
          el('td', { data: { label: '' } }, t.revoked_at ? null : self ? el('span', { class: 'muted small', text: 'this session' }) : button('Revoke…', async (ev) => {
            const answer = await confirmDialog({
              title: `Revoke token ${t.name}?`,
              message: `Anything using token ${t.id} loses access at once.`,
              ok: 'Revoke',
            });
            if (answer.ok) await act(ev.currentTarget, () => api('DELETE', `/tokens/${enc(t.id)}`), `Token ${t.name} is revoked.`);
          }, { class: 'danger small', ariaLabel: `Revoke token ${t.name}` })));
      }))));
  }

  /** What a token's scope limits: devices (a selector) and capabilities (patterns). */
  function limitsEl(scope) {
    const s = scope || {};
    const caps = s.capabilities || [];
    if (!s.selector && !caps.length) return el('span', { class: 'muted', text: 'none' });
    return el('div', { class: 'limits' },
      s.selector ? el('div', { data: { limit: 'selector' } }, el('span', { class: 'muted', text: 'devices ' }), el('code', { class: 'wrap', text: s.selector })) : null,
      caps.length ? el('div', { data: { limit: 'capabilities' } }, el('span', { class: 'muted', text: 'capabilities ' }),
        el('span', { class: 'badges' }, caps.map((c) => el('span', { class: 'badge perm', text: c })))) : null);
  }

  /** "devices matching site=lab; capabilities system.*" after `lead`, or '' for no limit. */
  function scopeText(scope, lead) {
    const s = scope || {};
    const parts = [];
    if (s.selector) parts.push(`devices matching ${s.selector}`);
    if (s.capabilities && s.capabilities.length) parts.push(`capabilities ${s.capabilities.join(' ')}`);
    return parts.length ? `${lead}only ${parts.join('; ')}` : '';
  }

  async function createToken(ev) {
    ev.preventDefault();
    const err = $('token-form-error');
    err.hidden = true;
    const fail = (text, field) => {
      err.textContent = text;
      err.hidden = false;
      if (field) field.focus();
    };
    const permissions = [...document.querySelectorAll('#token-form input[type=checkbox]:checked')].map((c) => c.value);
    if (!permissions.length) return fail('Choose at least one permission.');
    const name = $('token-name').value.trim() || null;
    const selector = $('token-selector').value.trim();
    const capabilities = $('token-capabilities').value.split(/[\s,]+/).filter(Boolean);
    const days = $('token-expires').value.trim();
    let expiresInSecs = null;
    if (days !== '') {
      const n = Number(days);
      if (!Number.isInteger(n) || n < 1 || n > 3650) return fail('Expires after: a whole number of days from 1 to 3650, or empty for never.', $('token-expires'));
      expiresInSecs = n * DAY_SECS;
    }
    if ((selector || capabilities.length) && permissions.includes(PERM.tokens)) {
      return fail('A token limited to devices or capabilities cannot carry tokens.manage: it could make tokens without its limits.');
    }
    const body = { name, permissions };
    if (selector) body.selector = selector;
    if (capabilities.length) body.capabilities = capabilities;
    if (expiresInSecs !== null) body.expires_in_secs = expiresInSecs;
    const btn = $('token-submit');
    btn.disabled = true;
    try {
      const created = (await api('POST', '/tokens', body)).data;
      for (const id of ['token-name', 'token-selector', 'token-capabilities', 'token-expires']) $(id).value = '';
      const secret = el('code', { class: 'secret', attrs: { id: 'created-secret', tabindex: 0 }, text: created.token });
      const limits = scopeText(created.scope, 'It may reach ');
      replace('token-created', el('div', { class: 'minted', attrs: { role: 'status' } },
        el('p', {}, el('strong', { text: `Token ${created.name} created.` }), ' Copy the secret now: it is shown only once and cannot be recovered.'),
        el('p', { attrs: { id: 'created-limits' } },
          limits ? `${limits}. ` : 'It reaches every device and capability its permissions allow. ',
          created.expires_at ? `It expires ${absolute(created.expires_at)}.` : 'It does not expire.'),
        secret,
        el('div', { class: 'actions' },
          button('Copy', async (e) => {
            const b = e.currentTarget;
            try {
              await navigator.clipboard.writeText(created.token);
              b.textContent = 'Copied';
            } catch (_) {
              const range = document.createRange();
              range.selectNodeContents(secret);
              const sel = getSelection();
              sel.removeAllRanges();
              sel.addRange(range);
              b.textContent = 'Selected: press Ctrl+C';
            }
          }, { id: 'copy-secret' }),
          button('Done', () => replace('token-created'), { class: 'secondary' }))));
      scheduleRefresh(0);
    } catch (e) {
      fail(describe(e));
    } finally {
      btn.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Confirmation dialog

  function confirmDialog({ title, message, ok, reason }) {
    const dialog = $('confirm-dialog');
    $('confirm-title').textContent = title;
    $('confirm-message').textContent = message;
    $('confirm-ok').textContent = ok || 'Confirm';
    $('confirm-reason-row').hidden = !reason;
    $('confirm-reason').value = '';
    dialog.returnValue = 'cancel';
    return new Promise((resolve) => {
      dialog.addEventListener('close', () => {
        resolve({ ok: dialog.returnValue === 'ok', reason: $('confirm-reason').value.trim() });
      }, { once: true });
      dialog.showModal();
      (reason ? $('confirm-reason') : $('confirm-cancel')).focus();
    });
  }

  // ---------------------------------------------------------------------------------------
  // Live events: SSE over fetch() so the token goes in a header

  function setStreamStatus(status, text) {
    state.stream.status = status;
    const node = $('stream-status');
    node.className = `stream-status ${status}`;
    node.textContent = text;
  }

  function stopStream() {
    const s = state.stream;
    clearTimeout(s.timer);
    s.timer = null;
    if (s.ctl) s.ctl.abort();
    s.ctl = null;
    setStreamStatus('off', '');
  }

  function startStream() {
    stopStream();
    if (!can(PERM.read)) {
      setStreamStatus('off', '○ no live updates (needs observability.read)');
      return;
    }
    connectStream();
  }

  function retryStream(why) {
    const s = state.stream;
    if (!state.token) return;
    const delay = BACKOFF_SECS[Math.min(s.attempt, BACKOFF_SECS.length - 1)] * (0.8 + Math.random() * 0.4);
    s.attempt += 1;
    let left = Math.round(delay);
    setStreamStatus('down', `○ reconnecting in ${left} s`);
    if (why) $('stream-status').title = why;
    const step = () => {
      left -= 1;
      if (left > 0) {
        setStreamStatus('down', `○ reconnecting in ${left} s`);
        s.timer = setTimeout(step, 1000);
      } else {
        connectStream();
      }
    };
    s.timer = setTimeout(step, 1000);
  }

  async function connectStream() {
    const s = state.stream;
    const ctl = new AbortController();
    s.ctl = ctl;
    setStreamStatus('connecting', '○ connecting');
    let watchdog = null;
    try {
      const res = await fetch(`${API}/events`, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        credentials: 'omit',
        signal: ctl.signal,
      });
      if (res.status === 401) {
        signOut('The anchor refused the token (unauthorized). Sign in again.');
        return;
      }
      if (res.status === 403) {
        setStreamStatus('off', '○ no live updates (needs observability.read)');
        return;
      }
      if (!res.ok || !res.body) throw new Error(`the event stream answered ${res.status}`);
      s.attempt = 0;
      s.lastByteAt = Date.now();
      setStreamStatus('live', '● live');
      $('stream-status').title = 'Receiving changes from the anchor';
      // Whatever happened while disconnected is unknown: re-read.
      scheduleRefresh(0);
      watchdog = setInterval(() => {
        if (Date.now() - s.lastByteAt > STREAM_SILENCE_MS) ctl.abort();
      }, 5000);
      await readSse(res.body, ctl, (type, data) => {
        if (type === 'lagged') scheduleRefresh(0);
        else onEvent(type, data);
      });
      if (s.ctl === ctl) retryStream('the anchor closed the event stream');
    } catch (err) {
      if (s.ctl !== ctl) return; // stopped on purpose (sign-out, restart)
      retryStream(String(err && err.message ? err.message : err));
    } finally {
      clearInterval(watchdog);
    }
  }

  /** Parses text/event-stream: `event:`, `data:` (joined with newlines), comments, blank line
   * dispatch. */
  async function readSse(body, ctl, dispatch) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let type = '';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      state.stream.lastByteAt = Date.now();
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        // A lone \r at the very end may be the first half of \r\n: wait for more.
        if (buffer[nl] === '\r' && nl === buffer.length - 1) break;
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (data.length) dispatch(type || 'message', data.join('\n'));
          type = '';
          data = [];
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? '' : line.slice(colon + 1);
        if (v.startsWith(' ')) v = v.slice(1);
        if (field === 'event') type = v;
        else if (field === 'data') data.push(v);
      }
      if (buffer.length > 8 * 1024 * 1024) {
        ctl.abort();
        throw new Error('event stream line too long');
      }
    }
  }

  function onEvent(kind, raw) {
    let ev;
    try {
      ev = JSON.parse(raw);
    } catch (_) {
      return;
    }
    const r = state.route;
    if (kind === 'pairing.requested') {
      const name = ev.data && (ev.data.device_name || ev.data.name);
      if (r.view !== 'pairing') banner(`A device${name ? ` (${name})` : ''} asks to pair.`, 'info', 'pairing');
    }
    if (kind === 'token' && ev.data && ev.data.action === 'revoked' && state.me && ev.data.id === state.me.token_id) {
      signOut('This token was revoked.');
      return;
    }
    let relevant;
    switch (r.view) {
      case 'inventory': relevant = kind !== 'token' && kind !== 'invocation' && kind !== 'batch'; break;
      case 'device': relevant = kind !== 'batch' && (!ev.device_id || ev.device_id === r.id); break;
      case 'batches': relevant = kind === 'batch'; break;
      // The event carries counts only; the read it triggers brings them with the devices'
      // states, so the two never disagree on the page.
      case 'batch': relevant = kind === 'batch' && !!ev.data && ev.data.batch_id === r.id; break;
      case 'pairing': relevant = kind.startsWith('pairing.') || kind.startsWith('device.'); break;
      case 'tokens': relevant = kind === 'token'; break;
      case 'audit': relevant = kind === 'token' || kind === 'policy' || kind.startsWith('pairing.') || kind.startsWith('device.'); break;
      default: relevant = false;
    }
    if (relevant) scheduleRefresh();
  }

  // ---------------------------------------------------------------------------------------
  // Start

  function init() {
    $('signin-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const token = $('signin-token').value.trim();
      const err = $('signin-error');
      err.hidden = true;
      if (!token) return;
      const btn = $('signin-submit');
      btn.disabled = true;
      try {
        await signIn(token);
      } catch (e) {
        err.textContent = e instanceof ApiError && e.status === 401
          ? 'The anchor does not know this token (or it was revoked).'
          : describe(e);
        err.hidden = false;
      } finally {
        btn.disabled = false;
      }
    });
    $('signout').addEventListener('click', () => signOut());
    $('filter-presence').addEventListener('change', (e) => setFilters({ ...state.filters, presence: e.target.value }));
    $('filter-trust').addEventListener('change', (e) => setFilters({ ...state.filters, trust: e.target.value }));
    $('filter-text').addEventListener('input', (e) => setFilters({ ...state.filters, text: e.target.value }));
    $('filter-selector').addEventListener('input', (e) => setFilters({ ...state.filters, selector: e.target.value }));
    $('filter-clear').addEventListener('click', () => setFilters({ presence: '', trust: '', text: '', selector: '' }));
    $('batch-form').addEventListener('submit', submitBatch);
    replace('batch-capabilities', BUILTIN_CAPABILITIES.map((c) => el('option', { attrs: { value: c } })));
    $('filters').addEventListener('submit', (e) => e.preventDefault());
    $('mint-form').addEventListener('submit', mint);
    $('token-form').addEventListener('submit', createToken);
    $('bulk-bar').addEventListener('submit', bulkInvoke);
    $('bulk-revoke').addEventListener('click', bulkRevoke);
    $('bulk-clear').addEventListener('click', () => {
      state.selected.clear();
      renderInventoryTable();
    });
    $('audit-filters').addEventListener('submit', (e) => e.preventDefault());
    for (const id of ['audit-target', 'audit-actor', 'audit-action', 'audit-since', 'audit-until']) {
      $(id).addEventListener('input', () => scheduleRefresh(SELECTOR_DEBOUNCE_MS));
    }
    $('audit-clear').addEventListener('click', () => {
      for (const id of ['audit-target', 'audit-actor', 'audit-action', 'audit-since', 'audit-until']) $(id).value = '';
      scheduleRefresh(0);
    });
    window.addEventListener('hashchange', route);
    setInterval(tick, 1000);
    // Heartbeats are not events (only presence changes are): re-read ages and loss now and then.
    setInterval(() => {
      const v = state.route.view;
      if (state.token && !document.hidden && (v === 'inventory' || v === 'device')) scheduleRefresh(0);
    }, HEARTBEAT_REFRESH_MS);
    // Running batches are re-read every second besides their events: the anchor publishes
    // progress at most every 250 ms, and a change inside that window waits for the next one.
    setInterval(() => {
      if (!state.token || document.hidden) return;
      const v = state.route.view;
      const running = v === 'batch' ? state.batch && !state.batch.done : v === 'batches' && state.batchesRunning;
      if (running) scheduleRefresh(0);
    }, BATCH_POLL_MS);

    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (!saved) {
      signOut();
      return;
    }
    signIn(saved).catch((e) => {
      if (e instanceof ApiError && e.status === 401) signOut('The saved token was refused. Sign in again.');
      else {
        // The anchor may be restarting: keep the token, show why.
        showView('signin');
        $('signin-error').textContent = `Cannot reach the anchor: ${describe(e)}`;
        $('signin-error').hidden = false;
      }
    });
  }

  init();
})();
