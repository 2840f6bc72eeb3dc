'use strict';
// Load generator for bench/run.py. Speaks Engine.IO 4 / Socket.IO 5 directly
// over the `ws` package (no socket.io-client: its per-socket overhead would
// make the generator, not the server, the bottleneck).
//
//   node loadgen.js '<json config>'
//
// Modes (config.mode):
//   connect  open config.count clients, config.concurrency in flight, each
//            authorizing with {token, organizationId}; time from opening the
//            websocket to the Socket.IO CONNECT ack (`40{...}`).
//   fanout   connect config.sockets clients the same way, print
//            {"phase":"connected"}, wait for a "go" line on stdin (the
//            runner samples server RSS meanwhile) unless config.waitGo is
//            false, then run config.steps: each publishes `events` events at
//            `rate` events/s through POST /api/v1/organizations/<org>/events
//            and measures every delivery (send time is in the event data).
//
// Output: one JSON object per line on stdout; the last one has "final": true.
// Traffic goes only to config.host (the runner passes 127.0.0.1); every loop
// is bounded by counts and by config.deadlineMs, after which the process
// prints what it has and exits.

const http = require('http');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

const cfg = JSON.parse(process.argv[2] || '{}');
const HOST = cfg.host || '127.0.0.1';
if (!/^127\.\d+\.\d+\.\d+$/.test(HOST) && HOST !== 'localhost') {
  console.error('loadgen: refusing non-loopback host ' + HOST);
  process.exit(2);
}
const PORT = cfg.port;
const ORG = String(cfg.org || '1');
const CONCURRENCY = cfg.concurrency || 100;
const CONNECT_TIMEOUT_MS = cfg.connectTimeoutMs || 15000;
const WS_URL = `ws://${HOST}:${PORT}/socket.io/?EIO=4&transport=websocket`;
const now = () => performance.now();

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const deadline = setTimeout(() => {
  out({ final: true, error: 'deadline', partial: partial() });
  process.exit(3);
}, cfg.deadlineMs || 120000);
deadline.unref();

let partialState = {};
function partial() {
  const { latencies, ...rest } = partialState;
  return { ...rest, connected: latencies ? latencies.length : undefined, received: cur ? cur.received : undefined };
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length) - 1;
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank))];
}

function summarize(values) {
  const a = Float64Array.from(values).sort();
  return {
    n: a.length,
    p50: percentile(a, 50),
    p90: percentile(a, 90),
    p99: percentile(a, 99),
    max: a.length ? a[a.length - 1] : null,
  };
}

// --- Socket.IO client, the minimum: open, auth, ack, pong, events ----------

const CH_0 = 0x30; // '0'
const CH_2 = 0x32; // '2'
const CH_3 = 0x33; // '3'
const CH_4 = 0x34; // '4'

class Client {
  constructor(index, token, onEvent) {
    this.index = index;
    this.token = token;
    this.onEvent = onEvent;
    this.ws = null;
    this.connected = false;
    this.closed = false;
  }

  // Resolves {ok, ms, code}; never rejects.
  connect() {
    return new Promise((resolve) => {
      const t0 = now();
      let tSent = 0;
      let done = false;
      const finish = (ok, code) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        resolve({ ok, code, ms: now() - t0, ackMs: tSent ? now() - tSent : null });
        if (!ok) this.terminate();
      };
      const timer = setTimeout(() => finish(false, 'timeout'), CONNECT_TIMEOUT_MS);
      const ws = new WebSocket(WS_URL, {
        perMessageDeflate: false, skipUTF8Validation: true, handshakeTimeout: CONNECT_TIMEOUT_MS,
      });
      this.ws = ws;
      ws.on('message', (data) => {
        const c0 = data[0];
        if (c0 === CH_4) {
          const c1 = data[1];
          if (c1 === CH_2) {
            if (this.onEvent) this.onEvent(this, data);
          } else if (c1 === CH_0) {
            this.connected = true;
            finish(true, null);
          } else if (c1 === CH_4) {
            let code = 'connect_error';
            try {
              const err = JSON.parse(data.toString('utf8', 2));
              code = (err.data && err.data.code) || err.message || code;
            } catch (e) { /* keep the generic code */ }
            finish(false, code);
          } else if (c1 === 0x31) { // '41' server-side disconnect
            this.closed = true;
          }
        } else if (c0 === CH_2) {
          ws.send('3'); // Engine.IO ping -> pong
        } else if (c0 === CH_0) {
          tSent = now();
          ws.send('40' + JSON.stringify({ token: this.token, organizationId: ORG }));
        }
      });
      ws.on('error', () => finish(false, 'ws_error'));
      ws.on('close', () => {
        this.closed = true;
        this.connected = false;
        finish(false, 'closed');
      });
    });
  }

  terminate() {
    if (this.ws) {
      try { this.ws.terminate(); } catch (e) { /* already gone */ }
    }
  }
}

// Connect `count` clients, `CONCURRENCY` at a time; returns stats and clients.
async function connectMany(count, tokenStart, onEvent) {
  const clients = [];
  const latencies = [];
  const ackLatencies = [];
  const errors = {};
  let next = 0;
  let lastAck = 0;
  const cpu0 = process.cpuUsage();
  const t0 = now();
  partialState = { phase: 'connecting', count, latencies, errors };
  async function worker() {
    while (next < count) {
      const i = next++;
      const c = new Client(i, `${cfg.tokenPrefix}${tokenStart + i}`, onEvent);
      const r = await c.connect();
      if (r.ok) {
        latencies.push(r.ms);
        ackLatencies.push(r.ackMs);
        lastAck = now();
        clients.push(c);
      } else {
        errors[r.code] = (errors[r.code] || 0) + 1;
      }
    }
  }
  const workers = [];
  for (let w = 0; w < Math.min(CONCURRENCY, count); w++) workers.push(worker());
  await Promise.all(workers);
  const elapsed = ((lastAck || now()) - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const lat = summarize(latencies);
  return {
    clients,
    stats: {
      attempted: count,
      ok: latencies.length,
      errors,
      elapsed_s: elapsed,
      connects_per_s: elapsed > 0 ? latencies.length / elapsed : null,
      loadgen_cpu_pct: elapsed > 0 ? (cpu.user + cpu.system) / 1e4 / elapsed : null,
      auth_ms: lat,
      ack_after_connect_packet_ms: summarize(ackLatencies),
    },
  };
}

function closeAll(clients) {
  for (const c of clients) c.terminate();
}

// --- publishing -------------------------------------------------------------

const agent = new http.Agent({ keepAlive: true, maxSockets: cfg.publishConnections || 8 });

function publish(body) {
  return new Promise((resolve) => {
    const t0 = now();
    const req = http.request({
      host: HOST,
      port: PORT,
      method: 'POST',
      path: `/api/v1/organizations/${encodeURIComponent(ORG)}/events`,
      agent,
      headers: {
        'Content-Type': 'application/json',
        'Content-Length': Buffer.byteLength(body),
        Authorization: `Bearer ${cfg.apiKey}`,
      },
      timeout: 30000,
    }, (res) => {
      res.resume();
      res.on('end', () => resolve({ status: res.statusCode, ms: now() - t0 }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', () => resolve({ status: 0, ms: now() - t0 }));
    req.end(body);
  });
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// --- fan-out ----------------------------------------------------------------

function readGo() {
  return new Promise((resolve) => {
    let buf = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (chunk) => {
      buf += chunk;
      if (buf.includes('\n')) {
        process.stdin.pause();
        resolve(buf.trim());
      }
    });
    process.stdin.on('end', () => resolve('eof'));
  });
}

// Current step's receive state, shared with the message handler.
let cur = null;

const KEY_S = Buffer.from('"s":');
const KEY_Q = Buffer.from('"q":');
const KEY_T = Buffer.from('"t":');

// The non-negative decimal number right after `key` in `buf`, parsed from
// the bytes (no string conversion: this runs once per delivery).
function numberAfter(buf, key, from) {
  let i = buf.indexOf(key, from);
  if (i < 0) return NaN;
  i += key.length;
  let v = 0;
  let c = buf[i];
  if (c < 0x30 || c > 0x39) return NaN;
  while (c >= 0x30 && c <= 0x39) {
    v = v * 10 + (c - 0x30);
    c = buf[++i];
  }
  if (c === 0x2e) { // '.'
    let scale = 0.1;
    c = buf[++i];
    while (c >= 0x30 && c <= 0x39) {
      v += (c - 0x30) * scale;
      scale /= 10;
      c = buf[++i];
    }
  }
  return v;
}

function onEvent(client, data) {
  const t = now();
  // 42["news",{"s":<step>,"q":<seq>,"t":<ms>,"p":"..."}]
  const step = numberAfter(data, KEY_S, 2);
  if (!cur || step !== cur.step) {
    if (cur) cur.stale++;
    return;
  }
  const seq = numberAfter(data, KEY_Q, 2);
  const sent = numberAfter(data, KEY_T, 2);
  if (!(seq >= 0 && seq < cur.events) || Number.isNaN(sent)) {
    cur.bad++;
    return;
  }
  const slot = client.index * cur.events + seq;
  if (cur.seen[slot]) {
    cur.duplicates++;
    return;
  }
  cur.seen[slot] = 1;
  cur.lat[cur.received++] = t - sent;
  cur.lastRecv = t;
}

async function runStep(stepIndex, step, clients) {
  const events = step.events;
  const rate = step.rate;
  const nSockets = clients.length;
  // index -> position in the bitmap: clients keep their connect index.
  const maxIndex = clients.reduce((m, c) => Math.max(m, c.index), 0) + 1;
  const expected = events * nSockets;
  cur = {
    step: stepIndex,
    events,
    seen: new Uint8Array(maxIndex * events),
    lat: new Float64Array(expected),
    received: 0,
    duplicates: 0,
    stale: 0,
    bad: 0,
    lastRecv: 0,
  };
  partialState = { phase: 'step', step: stepIndex, rate, events };
  const pad = 'x'.repeat(cfg.payloadBytes || 100);
  const httpLat = [];
  const statuses = {};
  const pending = [];
  const cpu0 = process.cpuUsage();
  const tStart = now();
  let firstSend = 0;
  let lastSend = 0;
  for (let i = 0; i < events; i++) {
    const due = tStart + (i * 1000) / rate;
    const wait = due - now();
    if (wait > 1) await sleep(wait);
    const t = now();
    if (i === 0) firstSend = t;
    lastSend = t;
    const body = `{"event":"news","data":{"s":${stepIndex},"q":${i},"t":${t.toFixed(3)},"p":"${pad}"}}`;
    pending.push(publish(body).then((r) => {
      httpLat.push(r.ms);
      statuses[r.status] = (statuses[r.status] || 0) + 1;
    }));
  }
  const sendSpan = (lastSend - firstSend) / 1000;
  await Promise.all(pending);
  // Drain: wait until every delivery arrived or the drain deadline passed.
  const drainUntil = now() + (cfg.drainMs || 3000);
  while (cur.received < expected && now() < drainUntil) await sleep(5);
  const cpu = process.cpuUsage(cpu0);
  const tEnd = now();
  const lat = summarize(cur.lat.subarray(0, cur.received));
  const span = ((cur.lastRecv || tEnd) - firstSend) / 1000;
  const disconnected = clients.filter((c) => c.closed).length;
  const result = {
    step: stepIndex,
    rate_events_per_s: rate,
    offered_deliveries_per_s: rate * nSockets,
    events,
    sockets: nSockets,
    expected,
    received: cur.received,
    missing: expected - cur.received,
    duplicates: cur.duplicates,
    stale_from_previous_step: cur.stale,
    malformed: cur.bad,
    disconnected,
    publish_span_s: sendSpan,
    actual_publish_rate: sendSpan > 0 ? (events - 1) / sendSpan : null,
    deliveries_per_s: span > 0 ? cur.received / span : null,
    latency_ms: lat,
    http_ms: summarize(httpLat),
    http_status: statuses,
    loadgen_cpu_pct: (100 * (cpu.user + cpu.system)) / 1000 / (tEnd - tStart),
  };
  result.pass = result.missing === 0 && result.duplicates === 0 && disconnected === 0
    && (statuses['202'] || 0) === events && lat.p99 !== null && lat.p99 <= (cfg.p99LimitMs || 200);
  return result;
}

async function fanout() {
  const { clients, stats } = await connectMany(cfg.sockets, cfg.tokenStart, onEvent);
  out({ phase: 'connected', ...stats });
  if (cfg.waitGo !== false) {
    const go = await readGo();
    if (go !== 'go') {
      closeAll(clients);
      out({ final: true, error: 'no go: ' + go });
      return;
    }
  }
  const steps = [];
  let failsInARow = 0;
  for (let j = 0; j < cfg.steps.length; j++) {
    const live = clients.filter((c) => !c.closed);
    const r = await runStep(j, cfg.steps[j], live);
    out({ phase: 'step', ...r });
    steps.push(r);
    failsInARow = r.pass ? 0 : failsInARow + 1;
    if (cfg.stopAfterFails && failsInARow >= cfg.stopAfterFails) break;
    await sleep(cfg.pauseMs || 300);
  }
  cur = null;
  closeAll(clients);
  out({ final: true, connect: stats, steps });
}

async function connectOnly() {
  const { clients, stats } = await connectMany(cfg.count, cfg.tokenStart, null);
  closeAll(clients);
  out({ final: true, ...stats });
}

(cfg.mode === 'fanout' ? fanout() : connectOnly())
  .then(() => {
    agent.destroy();
    setTimeout(() => process.exit(0), 50);
  })
  .catch((e) => {
    out({ final: true, error: String(e && e.stack || e) });
    process.exit(1);
  });
