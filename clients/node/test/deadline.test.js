'use strict';
// timeoutMs: null means "not given", as undefined does, on the client and on a call
// (Date.now() + null was a deadline of now: every call failed DEADLINE_EXCEEDED at once).
// On the client that is no deadline; on a call, the client's timeoutMs (as Python's
// timeout_s=None); a call opts out of the client's deadline with Infinity.
const assert = require('node:assert/strict');
const net = require('node:net');
const { test } = require('node:test');
const { createClient } = require('../mandant');

const INPUTS = [{ name: 'X', datatype: 'FP32', shape: [1], data: new Float32Array([1]) }];
// How long a call may stay unanswered before the test calls it hung.
const HUNG_MS = 5000;

/** The codeName a call fails with, 'OK', or 'HUNG' when it is still waiting after
 * `hungMs` (it is then abandoned: the client's close cancels it). */
async function outcome(target, clientOptions, inferOptions, hungMs = HUNG_MS) {
  const client = createClient(target, 'key', clientOptions);
  let timer;
  const hung = new Promise((resolve) => {
    timer = setTimeout(() => resolve('HUNG'), hungMs);
  });
  const answered = client.infer('m', INPUTS, inferOptions).then(
    () => 'OK',
    (error) => error.codeName,
  );
  try {
    return await Promise.race([answered, hung]);
  } finally {
    clearTimeout(timer);
    client.close();
  }
}

/** A TCP listener that accepts connections and never answers: a call to it ends only
 * at its deadline. Resolves to {target, close}. */
async function silentServer() {
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const close = () =>
    new Promise((resolve) => {
      for (const socket of sockets) socket.destroy();
      server.close(resolve);
    });
  return { target: `127.0.0.1:${server.address().port}`, close };
}

test('a null timeoutMs on the client sets no deadline', async () => {
  // No server listens on port 1: without a deadline the call fails UNAVAILABLE.
  assert.equal(await outcome('127.0.0.1:1', { timeoutMs: null }, {}), 'UNAVAILABLE');
  assert.equal(await outcome('127.0.0.1:1', {}, { timeoutMs: null }), 'UNAVAILABLE');
  assert.equal(await outcome('127.0.0.1:1', {}, { timeoutMs: 0 }), 'DEADLINE_EXCEEDED');
});

test("a null timeoutMs on a call keeps the client's", async () => {
  const silent = await silentServer();
  try {
    const client = { timeoutMs: 200 };
    assert.equal(await outcome(silent.target, client, { timeoutMs: null }), 'DEADLINE_EXCEEDED');
    assert.equal(await outcome(silent.target, client, {}), 'DEADLINE_EXCEEDED');
    // Without any deadline the call waits for an answer that never comes.
    assert.equal(await outcome(silent.target, { timeoutMs: null }, {}, 1000), 'HUNG');
    // A call's Infinity is no deadline, whatever the client's.
    assert.equal(await outcome(silent.target, client, { timeoutMs: Infinity }, 1000), 'HUNG');
  } finally {
    await silent.close();
  }
});
