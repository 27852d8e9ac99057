// Loaded into promptfoo's Node process (NODE_OPTIONS=--require): promptfoo may talk to this machine only.
// promptfoo sends a "telemetry disabled" event to its own host even with PROMPTFOO_DISABLE_TELEMETRY=1;
// this refuses every connection and DNS lookup that is not for a loopback address, before any packet
// leaves, and appends what it refused to the file named by OPENSEM_NET_LOG.
'use strict';
const fs = require('fs');
const dns = require('dns');
const net = require('net');

const LOG = process.env.OPENSEM_NET_LOG;
const LOOPBACK = /^(localhost|127(\.\d{1,3}){3}|::1|\[::1\]|::ffff:127(\.\d{1,3}){3})$/i;

function refused(kind, target) {
  if (LOG) {
    try { fs.appendFileSync(LOG, JSON.stringify({ kind, target: String(target), refused: true }) + '\n'); } catch (e) { /* best effort */ }
  }
  const err = new Error(`OpenSEM offline guard: refused ${kind} to ${target}`);
  err.code = 'ECONNREFUSED';
  return err;
}

function isLocal(host) {
  return host === undefined || host === null || host === '' || LOOPBACK.test(String(host));
}

const origConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  let opts = args[0];
  if (Array.isArray(opts)) opts = opts[0];
  let host;
  let port;
  if (opts && typeof opts === 'object') {
    if (opts.path) return origConnect.apply(this, args); // a local IPC pipe
    host = opts.host;
    port = opts.port;
  } else {
    port = opts;
    host = typeof args[1] === 'string' ? args[1] : undefined;
  }
  if (!isLocal(host)) {
    const err = refused('connect', `${host}:${port}`);
    process.nextTick(() => this.destroy(err));
    return this;
  }
  return origConnect.apply(this, args);
};

for (const [mod, name] of [[dns, 'lookup'], [dns, 'resolve'], [dns, 'resolve4'], [dns, 'resolve6'], [dns, 'resolveAny']]) {
  const orig = mod[name];
  if (typeof orig !== 'function') continue;
  mod[name] = function (host, ...rest) {
    if (isLocal(host)) return orig.call(this, host, ...rest);
    const cb = rest[rest.length - 1];
    const err = refused('dns.' + name, host);
    if (typeof cb === 'function') process.nextTick(() => cb(err));
    return undefined;
  };
}
for (const name of ['lookup', 'resolve', 'resolve4', 'resolve6', 'resolveAny']) {
  const orig = dns.promises[name];
  if (typeof orig !== 'function') continue;
  dns.promises[name] = function (host, ...rest) {
    return isLocal(host) ? orig.call(this, host, ...rest) : Promise.reject(refused('dns.' + name, host));
  };
}
require('module').syncBuiltinESMExports();
