// The sockets of the chaos soak (bench/soak.py): real socket.io-client 4.8 sockets that reconnect.
// Usage: NODE_PATH=.cache/npm/node_modules node bench/soak.js URL '[{"token": "...", "org": "..."}, ...]'
// (or the JSON array on the first line of stdin when argv has none).
// Opens one socket per entry, websocket only, reconnection on (0.5–2 s). For each socket it records
// every `n` of the "news" events it receives (data {org, n}; the offset that connection state recovery
// appends as the last argument is ignored), each connect (time, socket.recovered, how many events it had
// received by then), each disconnect (time, reason, events received by then) and each connect_error.
// Prints {"type": "ready", ...} once every socket has connected once (or after 60 s), then, on the line
// "report" on stdin (or on SIGTERM), one JSON line {"type": "report", "sockets": [...]} and exits.
'use strict';
const { io } = require('socket.io-client');

const url = process.argv[2];
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const now = () => Date.now() / 1000;

const sockets = [];
let connectedOnce = 0;
let readySent = false;
let total = 0;

function ready() {
  if (readySent) return;
  readySent = true;
  out({ type: 'ready', t: now(), connected: connectedOnce, sockets: total });
}

function open(entry, index) {
  const rec = { index, org: entry.org, token_index: entry.user, received: [], foreign: 0,
                connects: [], disconnects: [], connect_errors: [] };
  const socket = io(url, {
    auth: { token: entry.token, organizationId: entry.org },
    transports: ['websocket'],
    reconnection: true,
    reconnectionDelay: 500,
    reconnectionDelayMax: 2000,
    timeout: 10000,
  });
  socket.on('connect', () => {
    if (rec.connects.length === 0 && ++connectedOnce === total) ready();
    rec.connects.push({ t: now(), recovered: socket.recovered, at: rec.received.length, id: socket.id });
  });
  socket.on('disconnect', (reason) => rec.disconnects.push({ t: now(), reason, at: rec.received.length }));
  socket.on('connect_error', (err) => {
    if (rec.connect_errors.length < 50) rec.connect_errors.push({ t: now(), message: err.message });
  });
  socket.on('news', (data) => {
    if (data && data.org === rec.org && Number.isInteger(data.n)) rec.received.push(data.n);
    else rec.foreign += 1;
  });
  sockets.push({ rec, socket });
}

function report() {
  const recs = sockets.map(({ rec, socket }) => ({ ...rec, connected_at_end: socket.connected }));
  process.stdout.write(JSON.stringify({ type: 'report', t: now(), sockets: recs }) + '\n', () => {
    for (const { socket } of sockets) socket.close();
    process.exit(0);
  });
}

function start(entries) {
  // 5 ms apart: a few hundred handshakes in about a second, not all in the same tick.
  total = entries.length;
  entries.forEach((entry, i) => setTimeout(() => open(entry, i), 5 * i));
  setTimeout(ready, 60000 + 5 * entries.length).unref();
}

process.on('SIGTERM', report);
process.stdin.setEncoding('utf8');
let pending = '';
let started = false;
if (process.argv[3]) { start(JSON.parse(process.argv[3])); started = true; }
process.stdin.on('data', (chunk) => {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, newline).trim();
    pending = pending.slice(newline + 1);
    if (!started) { start(JSON.parse(line)); started = true; }
    else if (line === 'report') report();
  }
});
process.stdin.on('end', report);
