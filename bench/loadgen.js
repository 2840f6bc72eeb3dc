'use strict';
// Node load generator for bench/run.py: the scenarios the C fan-out client
// (shared/tools/loadgen-c) does not implement. It speaks RFC 6455 and
// Engine.IO 4 / Socket.IO 5 itself over plain `net` sockets (no ws package,
// no socket.io-client: their per-socket cost would make the generator the
// bottleneck), with loadgen-c's conventions: client k is user
// k + 1 + userOffset, its token is `tok` + the user number zero-padded to
// 37 digits, its organization ((user - 1) % orgs) + 1.
//
//   node loadgen.js '<json config>'
//
// Modes (config.mode):
//   sockets  connect config.stages[0] clients (config.concurrency in
//            flight), print {"phase":"connected","stage":0,...} with the
//            connect rate and the auth latencies (websocket open → Socket.IO
//            CONNECT ack), then wait for a line on stdin: "next" connects
//            the next stage (more clients, the earlier ones stay), "stop"
//            closes everything and prints the final line. Meanwhile every
//            client answers Engine.IO pings (the idle measurements).
//   bus      connect config.sockets clients to config.port, then run
//            config.steps (events/s): publish events through
//            POST /api/v1/organizations/<org>/events on config.publishPort
//            (another server process, or the same), round-robin over the
//            organizations, open loop, and check off every delivery.
//   storm    connect config.sockets clients of config.users users (client k
//            is user (k % users) + 1: many sockets share one token),
//            config.concurrency in flight, and print the "connected" line.
//            Then "watch" on stdin prints {"phase":"armed"} and, from then
//            on, every client the server closes reconnects at once (with the
//            pid of its CONNECT ack, as socket.io-client 4.6+ does), retried
//            after 1 s when refused, at most 5 attempts; the
//            "reconnected" line comes when all are back (or after
//            config.restartTimeoutMs). "stop" closes everything.
//   probe    connect one client, publish one event, print the raw text of
//            the frame that delivered it (what the fan-out parsers see).
//
// Output: one JSON object per line on stdout; the last one has "final": true.
// Traffic goes only to config.host, which must be a loopback address; every
// loop is bounded by counts and by config.deadlineMs, after which the
// process prints what it has and exits.

const http = require('http');
const net = require('net');
const { performance } = require('perf_hooks');

const cfg = JSON.parse(process.argv[2] || '{}');
const HOST = cfg.host || '127.0.0.1';
if (!/^127\.\d+\.\d+\.\d+$/.test(HOST)) {
  console.error('loadgen: refusing non-loopback host ' + HOST);
  process.exit(2);
}
const PORT = cfg.port;
const ORGS = cfg.orgs || 1;
const USER_OFFSET = cfg.userOffset || 0;
const CONCURRENCY = cfg.concurrency || 100;
const CONNECT_TIMEOUT_MS = cfg.connectTimeoutMs || 15000;
const now = () => performance.now();

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const deadline = setTimeout(() => {
  out({ final: true, error: 'deadline', phase: phase });
  process.exit(3);
}, cfg.deadlineMs || 120000);
deadline.unref();
let phase = 'start';

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length) - 1;
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank))];
}

function summarize(values) {
  const a = Float64Array.from(values).sort();
  return { n: a.length, p50: percentile(a, 50), p99: percentile(a, 99), max: a.length ? a[a.length - 1] : null };
}

function cpuPct(cpu0, wallMs) {
  const c = process.cpuUsage(cpu0);
  return wallMs > 0 ? (c.user + c.system) / 10 / wallMs : null;
}

// --- WebSocket + Socket.IO client, the minimum ---------------------------------

// RFC 6455's sample key and its accept value (any valid key will do; the C
// load generator does the same).
const WS_KEY = 'dGhlIHNhbXBsZSBub25jZQ==';
const WS_ACCEPT = 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=';
const HEADERS_END = Buffer.from('\r\n\r\n');
const MAX_MESSAGE = 16 * 1024 * 1024;

function upgradeRequest(port) {
  return Buffer.from(`GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: ${HOST}:${port}\r\n`
    + `Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${WS_KEY}\r\n`
    + 'Sec-WebSocket-Version: 13\r\n\r\n');
}

// config.transport "sse": the same clients as Server-Sent Events streams
// (GET /api/v1/stream, the token in a Bearer header): connected once the
// 200's headers and the stream's first comment arrived; heartbeats counted
// as pings; nothing is answered.
const SSE = cfg.transport === 'sse';

function streamRequest(port, user, org) {
  return Buffer.from(`GET /api/v1/stream?organizationId=${org} HTTP/1.1\r\nHost: ${HOST}:${port}\r\n`
    + `Authorization: Bearer ${tokenOf(user)}\r\nAccept: text/event-stream\r\n\r\n`);
}

// A masked client frame. The mask key is zero: a valid key that leaves the
// payload as it is (the server cannot tell; masking protects proxies we do
// not have).
function clientFrame(opcode, payload) {
  const n = payload.length;
  let head;
  if (n < 126) head = Buffer.from([0x80 | opcode, 0x80 | n, 0, 0, 0, 0]);
  else if (n < 65536) head = Buffer.from([0x80 | opcode, 0x80 | 126, n >> 8, n & 0xff, 0, 0, 0, 0]);
  else throw new Error('client frame too large');
  return Buffer.concat([head, payload]);
}
const PONG = clientFrame(1, Buffer.from('3'));

function tokenOf(user) {
  return 'tok' + String(user).padStart(37, '0');
}

class Client {
  // index: 0-based client number; the user and organization follow from it
  constructor(index, port, onEvent) {
    this.index = index;
    this.user = (cfg.users ? index % cfg.users : index) + 1 + USER_OFFSET;
    this.org = String(((this.user - 1) % ORGS) + 1);
    this.port = port;
    this.onEvent = onEvent;
    this.sock = null;
    this.pending = null;
    this.handshaking = true;
    this.frag = null;
    this.connected = false;
    this.closed = false;
    this.pings = 0;
    this.done = null;
    this.resumePid = null; // sent in the CONNECT payload (storm: a reconnect)
    this.pid = null; // the private session id of the CONNECT ack (recovery on)
    this.recovered = false; // the ack gave back the pid we sent
    this.onDrop = null; // called when the server closes a connected client
  }

  // Resolves {ok, code, ms, ackMs}; never rejects.
  connect() {
    return new Promise((resolve) => {
      const t0 = now();
      let tSent = 0;
      const timer = setTimeout(() => this.fail('timeout'), CONNECT_TIMEOUT_MS);
      this.done = (ok, code) => {
        this.done = null;
        clearTimeout(timer);
        resolve({ ok, code, ms: now() - t0, ackMs: tSent ? now() - tSent : null });
      };
      this.onOpen = () => {
        tSent = now();
        const pid = this.resumePid ? `,"pid":"${this.resumePid}"` : '';
        this.sendText(`40{"token":"${tokenOf(this.user)}","organizationId":"${this.org}"${pid}}`);
      };
      const sock = net.connect({ host: HOST, port: this.port });
      this.sock = sock;
      sock.setNoDelay(true);
      sock.on('connect', () => sock.write(SSE ? streamRequest(this.port, this.user, this.org)
        : upgradeRequest(this.port)));
      sock.on('data', (chunk) => this.onData(chunk));
      sock.on('error', (e) => this.fail('sock_error:' + (e.code || 'unknown')));
      sock.on('close', () => this.fail('closed'));
    });
  }

  // Before the CONNECT ack: the connect failed (counted by code). After it:
  // the socket was dropped.
  fail(code) {
    if (this.done) this.done(false, code);
    else if (this.connected && !this.closed) {
      dropped++;
      if (this.onDrop) this.onDrop(this, code);
    }
    this.connected = false;
    this.closed = true;
    this.terminate();
  }

  terminate() {
    if (this.sock) {
      this.sock.destroy();
      this.sock = null;
    }
  }

  sendText(text) {
    if (this.sock) this.sock.write(clientFrame(1, Buffer.from(text)));
  }

  onStreamData(chunk) {
    if (!this.handshaking) {
      for (let i = chunk.indexOf(': ping'); i >= 0; i = chunk.indexOf(': ping', i + 1)) this.pings++;
      return;
    }
    const buf = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = null;
    const end = buf.indexOf(HEADERS_END);
    if (end < 0 || buf.indexOf(': orgcast', end) < 0) {
      if (buf.length > 8192) this.fail('bad_handshake');
      else this.pending = buf;
      return;
    }
    const head = buf.toString('latin1', 0, end);
    if (!head.startsWith('HTTP/1.1 200')) {
      this.fail('refused:' + head.split('\r\n', 1)[0].slice(0, 60));
      return;
    }
    this.handshaking = false;
    this.connected = true;
    if (this.done) this.done(true, null);
  }

  onData(chunk) {
    if (SSE) return this.onStreamData(chunk);
    let buf = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = null;
    let off = 0;
    if (this.handshaking) {
      const end = buf.indexOf(HEADERS_END);
      if (end < 0) {
        if (buf.length > 8192) this.fail('bad_handshake');
        else this.pending = buf;
        return;
      }
      const head = buf.toString('latin1', 0, end);
      if (!head.startsWith('HTTP/1.1 101') || !head.includes(WS_ACCEPT)) {
        this.fail('handshake_refused:' + head.split('\r\n', 1)[0].slice(0, 60));
        return;
      }
      this.handshaking = false;
      off = end + 4;
    }
    while (buf.length - off >= 2 && !this.closed) {
      const b0 = buf[off];
      const b1 = buf[off + 1];
      let len = b1 & 0x7f;
      let h = 2;
      if (len === 126) {
        if (buf.length - off < 4) break;
        len = buf.readUInt16BE(off + 2);
        h = 4;
      } else if (len === 127) {
        if (buf.length - off < 10) break;
        len = Number(buf.readBigUInt64BE(off + 2));
        h = 10;
      }
      if (b1 & 0x80) return this.fail('masked_server_frame');
      if (len > MAX_MESSAGE) return this.fail('frame_too_large');
      if (buf.length - off < h + len) break;
      const payload = buf.subarray(off + h, off + h + len);
      off += h + len;
      const op = b0 & 0x0f;
      const fin = (b0 & 0x80) !== 0;
      if (op === 1 || op === 2) {
        if (fin) this.onMessage(payload);
        else this.frag = [Buffer.from(payload)];
      } else if (op === 0 && this.frag) {
        this.frag.push(Buffer.from(payload));
        if (fin) {
          const whole = Buffer.concat(this.frag);
          this.frag = null;
          this.onMessage(whole);
        }
      } else if (op === 8) {
        return this.fail('ws_close');
      } else if (op === 9) {
        if (this.sock) this.sock.write(clientFrame(10, Buffer.from(payload)));
      }
    }
    // Keep an incomplete frame (a copy: the chunk may be large).
    if (off < buf.length && !this.closed) this.pending = Buffer.from(buf.subarray(off));
  }

  onMessage(data) {
    const c0 = data[0];
    if (c0 === 0x34) { // '4': Socket.IO
      const c1 = data[1];
      if (c1 === 0x32) { // 42[...]: an event
        if (this.onEvent) this.onEvent(this, data);
      } else if (c1 === 0x30) { // 40{"sid":...}: CONNECT ack
        this.connected = true;
        if (cfg.trackPid) {
          try {
            this.pid = JSON.parse(data.toString('utf8', 2)).pid || null;
          } catch (e) { /* no pid */ }
          this.recovered = this.resumePid !== null && this.pid === this.resumePid;
        }
        if (this.done) this.done(true, null);
      } else if (c1 === 0x34) { // 44{...}: refused
        let code = 'connect_error';
        try {
          const err = JSON.parse(data.toString('utf8', 2));
          code = 'connect_error:' + ((err.data && err.data.code) || err.message || 'unknown');
        } catch (e) { /* keep the generic code */ }
        this.fail(code);
      } else if (c1 === 0x31) { // 41: disconnected by the server
        this.fail('server_disconnect');
      }
    } else if (c0 === 0x32) { // Engine.IO ping -> pong
      this.pings++;
      if (this.sock) this.sock.write(PONG);
    } else if (c0 === 0x30) { // Engine.IO open: authorize
      this.onOpen();
    } else if (c0 === 0x31) { // Engine.IO close
      this.fail('eio_close');
    }
  }
}

let dropped = 0; // sockets closed after their CONNECT ack

// Connect clients [first, first + count), CONCURRENCY at a time.
async function connectMany(first, count, port, onEvent) {
  const clients = [];
  const latencies = [];
  const ackLatencies = [];
  const errors = {};
  let next = first;
  const end = first + count;
  let lastAck = 0;
  const cpu0 = process.cpuUsage();
  const t0 = now();
  async function worker() {
    while (next < end) {
      const c = new Client(next++, port, onEvent);
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
  const wallMs = (lastAck || now()) - t0;
  return {
    clients,
    stats: {
      attempted: count,
      ok: latencies.length,
      errors,
      elapsed_s: wallMs / 1000,
      connects_per_s: wallMs > 0 ? latencies.length / (wallMs / 1000) : null,
      loadgen_cpu_pct: cpuPct(cpu0, now() - t0),
      auth_ms: summarize(latencies),
      connect_packet_to_ack_ms: summarize(ackLatencies),
    },
  };
}

function closeAll(clients) {
  for (const c of clients) {
    c.closed = true;
    c.terminate();
  }
}

function readLines(onLine) {
  let buf = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      onLine(line);
    }
  });
  process.stdin.on('end', () => onLine('eof'));
}

function nextLine() {
  return new Promise((resolve) => {
    lineWaiters.push(resolve);
  });
}
const lineWaiters = [];
const lineQueue = [];
readLines((line) => {
  if (lineWaiters.length) lineWaiters.shift()(line);
  else lineQueue.push(line);
});
function takeLine() {
  return lineQueue.length ? Promise.resolve(lineQueue.shift()) : nextLine();
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// --- sockets: connect in stages, stay idle ---------------------------------------

async function socketsMode() {
  const all = [];
  const stages = [];
  let first = 0;
  for (let i = 0; i < cfg.stages.length; i++) {
    phase = 'connecting stage ' + i;
    const { clients, stats } = await connectMany(first, cfg.stages[i], PORT, null);
    first += cfg.stages[i];
    all.push(...clients);
    const line = { phase: 'connected', stage: i, open: all.filter((c) => !c.closed).length, ...stats };
    stages.push(line);
    out(line);
    phase = 'idle after stage ' + i;
    const cmd = await takeLine();
    if (cmd === 'next' && i + 1 < cfg.stages.length) continue;
    break;
  }
  const pings = all.reduce((n, c) => n + c.pings, 0);
  const open = all.filter((c) => !c.closed).length;
  closeAll(all);
  out({ final: true, stages, open_at_end: open, dropped, pings_answered: pings });
}

// --- storm: many sockets per token, then a restart that closes them all -----------

async function stormMode() {
  phase = 'storm';
  const { clients, stats } = await connectMany(0, cfg.sockets, PORT, null);
  const users = new Set(clients.map((c) => c.user)).size;
  out({ phase: 'connected', open: clients.filter((c) => !c.closed).length, users, ...stats });
  let cmd = await takeLine();
  if (cmd === 'watch') {
    phase = 'restart';
    const live = clients.filter((c) => !c.closed);
    const r = await watchRestart(live);
    clients.splice(0, clients.length, ...r.clients);
    delete r.clients;
    out({ phase: 'reconnected', ...r });
    cmd = await takeLine();
  }
  const open = clients.filter((c) => !c.closed).length;
  closeAll(clients);
  out({ final: true, open_at_end: open, dropped });
}

// Every client that the server closes from now on reconnects at once; resolves when
// all of `live` are back (or at the timeout) with what it saw. Times are ms since "armed".
function watchRestart(live) {
  return new Promise((resolve) => {
    const t0 = now();
    const n = live.length;
    const reasons = {};
    const errors = {};
    const lat = [];
    const back = new Array(n).fill(null);
    let firstDrop = null;
    let lastDrop = null;
    let firstAck = null;
    let lastAck = null;
    let reconnected = 0;
    let recovered = 0;
    let attempts = 0;
    let inFlight = 0;
    let maxInFlight = 0;
    let finished = false;
    const cpu0 = process.cpuUsage();
    const finish = (timedOut) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      const ms = (t) => (t === null ? null : t - t0);
      resolve({
        sockets: n, dropped: Object.values(reasons).reduce((a, b) => a + b, 0), close_reasons: reasons,
        reconnected, recovered, attempts, errors, timed_out: timedOut, max_in_flight: maxInFlight,
        first_drop_ms: ms(firstDrop), last_drop_ms: ms(lastDrop), first_ack_ms: ms(firstAck),
        last_ack_ms: ms(lastAck),
        drop_to_last_ack_ms: firstDrop !== null && lastAck !== null ? lastAck - firstDrop : null,
        reconnect_ms: summarize(lat), loadgen_cpu_pct: cpuPct(cpu0, now() - t0),
        clients: back.map((c, i) => c || live[i]),
      });
    };
    const timer = setTimeout(() => finish(true), cfg.restartTimeoutMs || 30000);
    async function reconnect(slot, pid, tDrop, attempt) {
      attempts++;
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      const c = new Client(live[slot].index, PORT, null);
      c.resumePid = pid;
      const r = await c.connect();
      inFlight--;
      if (finished) {
        closeAll([c]);
        return;
      }
      if (r.ok) {
        back[slot] = c;
        lat.push(now() - tDrop);
        lastAck = now();
        if (firstAck === null) firstAck = lastAck;
        reconnected++;
        if (c.recovered) recovered++;
        c.onDrop = (cc, code) => { // closed again (it reached a worker that was stopping)
          reasons['again:' + code] = (reasons['again:' + code] || 0) + 1;
          reconnected--;
          if (cc.recovered) recovered--;
          reconnect(slot, cc.pid, now(), 1);
        };
        if (reconnected === n) finish(false);
      } else {
        errors[r.code] = (errors[r.code] || 0) + 1;
        if (attempt < 5) setTimeout(() => reconnect(slot, pid, tDrop, attempt + 1), 1000);
      }
    }
    live.forEach((c, slot) => {
      c.onDrop = (cc, code) => {
        const t = now();
        reasons[code] = (reasons[code] || 0) + 1;
        if (firstDrop === null) firstDrop = t;
        lastDrop = t;
        reconnect(slot, cc.pid, t, 1);
      };
    });
    out({ phase: 'armed', sockets: n });
  });
}

// --- probe: the raw frame of one event --------------------------------------------

async function probeMode() {
  phase = 'probe';
  let frame = null;
  let resolveFrame;
  const got = new Promise((r) => { resolveFrame = r; });
  const { clients, stats } = await connectMany(0, 1, PORT, (c, data) => {
    if (frame === null) {
      frame = data.toString('utf8');
      resolveFrame();
    }
  });
  if (!clients.length) throw new Error('probe: connect failed: ' + JSON.stringify(stats.errors));
  const status = await publish(clients[0].org, '{"event":"news","data":{"s":0,"t":0,"o":"'
    + clients[0].org + '","p":"probe"}}');
  await Promise.race([got, sleep(3000)]);
  closeAll(clients);
  out({ final: true, http_status: status, frame, ack_pid: clients[0].pid });
}

// --- bus: publish to one server, receive from another ---------------------------

const KEY_T = Buffer.from('"t":');
const KEY_O = Buffer.from('"o":"');
const PREFIX = Buffer.from('42["news",{"s":');

// The non-negative decimal number at buf[i...] (parsed from the bytes: this
// runs once per delivery).
function numberAt(buf, i) {
  let v = 0;
  let c = buf[i];
  if (c < 0x30 || c > 0x39) return NaN;
  while (c >= 0x30 && c <= 0x39) {
    v = v * 10 + (c - 0x30);
    c = buf[++i];
  }
  if (c === 0x2e) {
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

let step = null; // the bookkeeping of the current step

function onBusEvent(client, data) {
  const t = now();
  if (!step || data.compare(PREFIX, 0, PREFIX.length, 0, PREFIX.length) !== 0) {
    if (step) step.foreign++;
    return;
  }
  const seq = numberAt(data, PREFIX.length) - step.seq0;
  const it = data.indexOf(KEY_T, PREFIX.length);
  const io = data.indexOf(KEY_O, PREFIX.length);
  if (!(seq >= 0 && seq < step.total) || it < 0 || io < 0) {
    step.foreign++;
    return;
  }
  const org = client.org;
  let ok = data[io + KEY_O.length + org.length] === 0x22;
  for (let k = 0; ok && k < org.length; k++) ok = data[io + KEY_O.length + k] === org.charCodeAt(k);
  if (!ok) step.misdelivered++;
  step.counts[seq]++;
  step.lat[step.delivered++] = t - numberAt(data, it + KEY_T.length);
  step.lastRecv = t;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: cfg.pubConns || 4 });

function publish(org, body) {
  return new Promise((resolve) => {
    const req = http.request({
      host: HOST,
      port: cfg.publishPort || PORT,
      method: 'POST',
      path: `/api/v1/organizations/${org}/events`,
      agent,
      headers: {
        'Content-Type': 'application/json',
        'Content-Length': Buffer.byteLength(body),
        Authorization: `Bearer ${cfg.apiKey}`,
      },
      timeout: 30000,
    }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', () => resolve(0));
    req.end(body);
  });
}

let seqBase = 0;

async function runStep(rate, durS, perOrg) {
  const total = Math.max(1, Math.round(rate * durS));
  const expectedPer = new Uint32Array(total);
  let expected = 0;
  for (let k = 0; k < total; k++) {
    expectedPer[k] = perOrg[(k % ORGS) + 1] || 0;
    expected += expectedPer[k];
  }
  step = {
    seq0: seqBase, total, counts: new Uint32Array(total), lat: new Float64Array(expected * 2 + 16),
    delivered: 0, misdelivered: 0, foreign: 0, lastRecv: 0,
  };
  const pad = 'x'.repeat(cfg.payloadBytes || 100);
  const statuses = {};
  const httpLat = [];
  const pending = [];
  const cpu0 = process.cpuUsage();
  const tStart = now() + 5;
  for (let k = 0; k < total; k++) {
    const due = tStart + (k * 1000) / rate;
    const wait = due - now();
    if (wait > 1) await sleep(wait);
    const org = (k % ORGS) + 1;
    // The intended send time, as loadgen-c: lateness of the publisher counts.
    const body = `{"event":"news","data":{"s":${seqBase + k},"t":${due.toFixed(3)},"o":"${org}","p":"${pad}"}}`;
    pending.push(publish(org, body).then((status) => {
      httpLat.push(now() - due);
      statuses[status] = (statuses[status] || 0) + 1;
    }));
  }
  await Promise.all(pending);
  const tPubEnd = now();
  const drainUntil = tPubEnd + (cfg.drainMs || 3000);
  while (step.delivered < expected && now() < drainUntil) await sleep(5);
  const s = step;
  step = null;
  seqBase += total;
  let lost = 0;
  let duplicates = 0;
  for (let k = 0; k < total; k++) {
    if (s.counts[k] < expectedPer[k]) lost += expectedPer[k] - s.counts[k];
    else duplicates += s.counts[k] - expectedPer[k];
  }
  const span = Math.max(total / rate, ((s.lastRecv || tPubEnd) - tStart) / 1000);
  const deliveredPerS = s.delivered / span;
  const lat = summarize(s.lat.subarray(0, s.delivered));
  const clean = lost === 0 && duplicates === 0 && s.misdelivered === 0 && (statuses[202] || 0) === total;
  return {
    events_per_s: rate,
    events: total,
    expected,
    delivered: s.delivered,
    lost,
    duplicates,
    misdelivered: s.misdelivered,
    foreign: s.foreign,
    deliveries_per_s: deliveredPerS,
    achieved_events_per_s: (total * deliveredPerS) / Math.max(1, expected),
    latency_ms: lat,
    publish_ms: summarize(httpLat),
    http_status: statuses,
    dropped_sockets: dropped,
    loadgen_cpu_pct: cpuPct(cpu0, now() - tStart),
    keeps_up: clean && deliveredPerS >= 0.95 * rate * (expected / total),
    pass: clean && lat.p99 !== null && lat.p99 <= (cfg.p99LimitMs || 200),
  };
}

// The ladder: up until a step does not keep up; a step that keeps up but
// misses the p99 limit is run once more before it counts (one stall is not
// a limit), as loadgen-c does.
async function busMode() {
  phase = 'connecting';
  const { clients, stats } = await connectMany(0, cfg.sockets, PORT, onBusEvent);
  out({ phase: 'connected', ...stats });
  const perOrg = {};
  for (const c of clients) perOrg[c.org] = (perOrg[c.org] || 0) + 1;
  await sleep(500);
  phase = 'warm-up';
  await runStep(cfg.steps[0], 1, perOrg);
  const steps = [];
  for (let i = 0; i < cfg.steps.length; i++) {
    phase = 'step ' + i;
    let r = await runStep(cfg.steps[i], cfg.stepS || 4, perOrg);
    if (!r.pass && r.keeps_up) {
      out({ phase: 'step', retried: true, ...r });
      steps.push({ retried: true, ...r });
      r = await runStep(cfg.steps[i], cfg.stepS || 4, perOrg);
    }
    out({ phase: 'step', ...r });
    steps.push(r);
    if (!r.keeps_up || dropped) break;
    await sleep(300);
  }
  closeAll(clients);
  out({ final: true, connect: stats, steps });
}

const MODES = { bus: busMode, storm: stormMode, probe: probeMode, sockets: socketsMode };
(MODES[cfg.mode] || socketsMode)()
  .then(() => {
    agent.destroy();
    setTimeout(() => process.exit(0), 50);
  })
  .catch((e) => {
    out({ final: true, error: String((e && e.stack) || e) });
    process.exit(1);
  });
