'use strict';
// timeoutMs: null means no deadline, as undefined does (Date.now() + null was a deadline
// of now: every call failed DEADLINE_EXCEEDED at once). No server listens on port 1, so
// a call without a deadline fails UNAVAILABLE instead.
const assert = require('node:assert/strict');
const { test } = require('node:test');
const { createClient } = require('../mandant');

const INPUTS = [{ name: 'X', datatype: 'FP32', shape: [1], data: new Float32Array([1]) }];

async function failure(clientOptions, inferOptions) {
  const client = createClient('127.0.0.1:1', 'key', clientOptions);
  try {
    await client.infer('m', INPUTS, inferOptions);
  } catch (error) {
    return error.codeName;
  } finally {
    client.close();
  }
  return 'OK';
}

test('a null timeoutMs sets no deadline, on the client or on a call', async () => {
  assert.equal(await failure({ timeoutMs: null }, {}), 'UNAVAILABLE');
  assert.equal(await failure({}, { timeoutMs: null }), 'UNAVAILABLE');
  assert.equal(await failure({ timeoutMs: 60000 }, { timeoutMs: null }), 'UNAVAILABLE');
  assert.equal(await failure({}, { timeoutMs: 0 }), 'DEADLINE_EXCEEDED');
});
