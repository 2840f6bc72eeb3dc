// Publish with the real Node emitters existing backends use, then exit.
// Usage: node emit.js redis|postgres URL '<JSON list of operations>'
// An operation: {"to": [rooms], "except": [rooms], "args": [event, ...args]}
//            or {"disconnect": [rooms]} | {"socketsJoin": [rooms], "to": [rooms]}
//            or {"of": "/admin", "to": [...], "args": [...]} (another namespace).
'use strict';

const [kind, url, opsJson] = process.argv.slice(2);
const ops = JSON.parse(opsJson);

function apply(emitter, op) {
  let target = op.of ? emitter.of(op.of) : emitter;
  if (op.to) target = target.to(op.to);
  if (op.except) target = target.except(op.except);
  if (op.disconnect) return target.in(op.disconnect).disconnectSockets(true);
  if (op.socketsJoin) return target.socketsJoin(op.socketsJoin);
  return target.emit(...op.args);
}

async function main() {
  if (kind === 'redis') {
    const { createClient } = require('redis');
    const { Emitter } = require('@socket.io/redis-emitter');
    const client = createClient({ url });
    await client.connect();
    const emitter = new Emitter(client);
    for (const op of ops) apply(emitter, op);
    await client.quit();  // sends what is queued, then closes
  } else {
    const { Pool } = require('pg');
    const { Emitter } = require('@socket.io/postgres-emitter');
    const pool = new Pool({ connectionString: url, max: 1 });
    const emitter = new Emitter(pool);
    for (const op of ops) {
      apply(emitter, op);
      // The emitter does not wait for its NOTIFY; keep the order by pausing.
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
    await pool.end();
  }
}

main().then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });
setTimeout(() => process.exit(3), 20000).unref();
