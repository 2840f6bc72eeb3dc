// A real socket.io-client 4.x (the one `make` fetches from npm) for the tests.
// Usage: node client.js URL '{"auth": {...}, "transports": [...], "query": {...}, "extraHeaders": {...}}'
// Prints one JSON object a line: {"type": "connect"}, {"type": "connect_error",
// "message", "data"}, {"type": "event", "name", "args"}, {"type": "disconnect", "reason"}.
// Reads commands on stdin, one a line: "close"; "drop" (cut the transport,
// as a network change does: the client reconnects by itself when reconnection
// is on); "emit <json [event, ...args]>" (waits for the ack, printed as
// {"type": "ack", "args"}).
'use strict';
const { io } = require('socket.io-client');

const [url, optionsJson] = process.argv.slice(2);
const options = JSON.parse(optionsJson || '{}');
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const socket = io(url, { reconnection: false, timeout: 10000, ...options });
socket.on('connect', () => out({ type: 'connect', id: socket.id, recovered: socket.recovered }));
socket.on('connect_error', (err) => out({ type: 'connect_error', message: err.message, data: err.data }));
socket.on('disconnect', (reason) => out({ type: 'disconnect', reason }));
socket.onAny((name, ...args) => out({ type: 'event', name, args }));

process.stdin.setEncoding('utf8');
let pending = '';
process.stdin.on('data', (chunk) => {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, newline).trim();
    pending = pending.slice(newline + 1);
    if (line === 'close') { socket.close(); setTimeout(() => process.exit(0), 50); }
    else if (line === 'drop') { socket.io.engine.close(); }
    else if (line.startsWith('emit ')) {
      const [event, ...args] = JSON.parse(line.slice(5));
      socket.timeout(10000).emit(event, ...args, (err, ...ackArgs) => out({ type: 'ack', error: err ? String(err) : null, args: ackArgs }));
    }
  }
});
process.stdin.on('end', () => { socket.close(); process.exit(0); });
// Never outlive the test that started it.
setTimeout(() => process.exit(3), 60000).unref();
