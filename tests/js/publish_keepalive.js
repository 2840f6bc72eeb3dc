// Publish N events in a row the way node-fetch does it on Node >= 19: a
// keep-alive agent, and "Connection: close" on each request. A server that
// closes without saying so makes every other request fail with "socket hang up".
// Usage: node publish_keepalive.js URL API_KEY N — prints each status, one a line.
'use strict';
const http = require('http');

const [url, key, count] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const body = JSON.stringify({ event: 'news', data: { from: 'node' } });

function publish() {
  return new Promise((resolve, reject) => {
    const req = http.request(`${url}/api/v1/organizations/org-a/events`, {
      method: 'POST', agent,
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json',
                 'Content-Length': Buffer.byteLength(body), Connection: 'close' },
    }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode)); });
    req.on('error', reject);
    req.end(body);
  });
}

(async () => {
  for (let i = 0; i < Number(count); i++) {
    try {
      console.log(await publish());
    } catch (err) {
      console.log(`error:${err.message.replace(/\s+/g, '_')}`);
    }
  }
  agent.destroy();
})();
setTimeout(() => process.exit(3), 20000).unref();
