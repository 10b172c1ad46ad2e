'use strict';
// mandant.js against a fake KServe v2 server (grpc-js, in this process, on the real
// proto): option and key checks, errors after close(), size-limit errors, call fields.
const assert = require('node:assert/strict');
const { test, before, after } = require('node:test');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const path = require('node:path');
const { createClient, MandantError, DEFAULT_PROTO_DIR } = require('../mandant');

const INPUTS = [{ name: 'X', datatype: 'FP32', shape: [1], data: new Float32Array([1]) }];
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
// A test that calls the fake server fails, rather than hangs, when a call never settles.
const CALLS = { timeout: 15000 };

/** The requests the fake server got, last one last. */
const received = [];
let server;
let target;

/** ModelInfer: echoes each input as an output of the same name; model 'big' answers an
 * output over the client's 64 MiB receive limit; model 'slow' answers after 300 ms. */
function modelInfer(call, callback) {
  const request = call.request;
  received.push(request);
  if (request.model_name === 'slow') {
    setTimeout(() => callback(null, echo(request)), 300);
    return;
  }
  if (request.model_name === 'big') {
    const raw = Buffer.alloc(MAX_MESSAGE_BYTES + 1024);
    callback(null, {
      model_name: 'big',
      outputs: [{ name: 'Y', datatype: 'UINT8', shape: [String(raw.length)] }],
      raw_output_contents: [raw],
    });
    return;
  }
  callback(null, echo(request));
}

function echo(request) {
  return {
    model_name: request.model_name,
    model_version: request.model_version,
    id: request.id,
    outputs: request.inputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
    raw_output_contents: request.raw_input_contents,
  };
}

before(async () => {
  const definition = protoLoader.loadSync(path.join(DEFAULT_PROTO_DIR, 'grpc_service.proto'), {
    includeDirs: [DEFAULT_PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { GRPCInferenceService } = grpc.loadPackageDefinition(definition).inference;
  server = new grpc.Server({ 'grpc.max_send_message_length': 2 * MAX_MESSAGE_BYTES });
  server.addService(GRPCInferenceService.service, { ModelInfer: modelInfer });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  target = `127.0.0.1:${port}`;
});

after(() => server.forceShutdown());

/** Runs `body(client)` with a client of the fake server, closed afterwards. */
async function withClient(options, body, apiKey = 'key') {
  const client = createClient(target, apiKey, options);
  try {
    return await body(client);
  } finally {
    client.close();
  }
}

test('a client timeoutMs that is NaN, negative or not a number is a TypeError at createClient', () => {
  for (const timeoutMs of [NaN, Number(process.env.MANDANT_SURELY_UNSET_TIMEOUT), -1, -Infinity, '1000', {}]) {
    assert.throws(
      () => createClient('127.0.0.1:1', 'key', { timeoutMs }),
      (error) => error instanceof TypeError && /^createClient: timeoutMs is a number/.test(error.message),
      `timeoutMs ${String(timeoutMs)}`,
    );
  }
});

test("a call's timeoutMs that is NaN, negative or a string rejects the call with a TypeError", CALLS, async () => {
  await withClient({}, async (client) => {
    await client.infer('m', INPUTS); // connected: grpc-js's own deadline checks would run
    for (const timeoutMs of [NaN, -5, '1000']) {
      await assert.rejects(
        client.infer('m', INPUTS, { timeoutMs }),
        (error) => error instanceof TypeError && /^ModelInfer: timeoutMs is a number/.test(error.message),
        `timeoutMs ${String(timeoutMs)}`,
      );
    }
  });
});

test('a far-future timeoutMs is clamped, Infinity is no deadline: the calls pass', CALLS, async () => {
  // Before: grpc-js threw "Deadline is too far in the future" in its own promise chain
  // once the channel was connected (an unhandled rejection: the process ended).
  for (const timeoutMs of [1e15, Number.MAX_VALUE, Infinity]) {
    await withClient({ timeoutMs }, async (client) => {
      const outputs = await client.infer('m', INPUTS);
      assert.deepEqual([...outputs.X.data], [1]);
      const again = await client.infer('m', INPUTS, { timeoutMs });
      assert.deepEqual([...again.X.data], [1]);
    });
  }
});

test('a relative protoDir loads the protos without a warning', CALLS, async () => {
  // It was joined to the file's name and also given as the include directory: the
  // loader looked for protos/protos/grpc_service.proto and warned on every client.
  const warnings = [];
  const onWarning = (warning) => warnings.push(warning.message);
  const cwd = process.cwd();
  process.on('warning', onWarning);
  process.chdir(path.dirname(DEFAULT_PROTO_DIR));
  try {
    await withClient({ protoDir: path.basename(DEFAULT_PROTO_DIR) }, async (client) => {
      const outputs = await client.infer('m', INPUTS);
      assert.deepEqual([...outputs.X.data], [1]);
    });
  } finally {
    process.chdir(cwd);
    process.off('warning', onWarning);
  }
  assert.deepEqual(warnings, []);
});

test('a request over the size limit is RESOURCE_EXHAUSTED that is not retryable', CALLS, async () => {
  await withClient({ timeoutMs: 30000 }, async (client) => {
    const count = MAX_MESSAGE_BYTES / 4 + 1024;
    const huge = [{ name: 'X', datatype: 'FP32', shape: [count], data: new Float32Array(count) }];
    const sent = await client.infer('m', huge).catch((error) => error);
    assert.ok(sent instanceof MandantError, String(sent));
    assert.equal(sent.codeName, 'RESOURCE_EXHAUSTED');
    assert.equal(sent.retryable, false);
    assert.equal(sent.retryAfterMs, null);
    const answered = await client.infer('big', INPUTS).catch((error) => error);
    assert.ok(answered instanceof MandantError, String(answered));
    assert.equal(answered.codeName, 'RESOURCE_EXHAUSTED');
    assert.match(answered.details, /larger than max/);
    assert.equal(answered.retryable, false);
  });
});

test('retryable: RESOURCE_EXHAUSTED of a limit and UNAVAILABLE are, the rest is not', () => {
  const trailers = new grpc.Metadata();
  trailers.set('grpc-retry-pushback-ms', '1500');
  const limited = new MandantError({ code: 8, details: "tenant 'x': rate limit", metadata: trailers });
  assert.equal(limited.retryable, true);
  assert.equal(limited.retryAfterMs, 1500);
  const server = new MandantError({ code: 8, details: 'Received message larger than max (70000000 vs. 67108864)' });
  assert.equal(server.retryable, false);
  assert.equal(new MandantError({ code: 14, details: 'No connection established' }).retryable, true);
  assert.equal(new MandantError({ code: 5, details: "model 'm' not found" }).retryable, false);
  assert.equal(new MandantError({ code: 3, details: 'wrong shape' }).retryable, false);
});

test('a call in flight at close() is answered; one made after it is not', CALLS, async () => {
  const client = createClient(target, 'key');
  const inFlight = client.infer('slow', INPUTS);
  await new Promise((resolve) => setTimeout(resolve, 50));
  client.close();
  await assert.rejects(client.infer('m', INPUTS), (error) => error.details === 'the client was closed');
  const outputs = await inFlight;
  assert.deepEqual(Array.from(outputs.X.data), [1]);
});

test('calls made just before close() are answered, on a cold channel or a warm one', CALLS, async () => {
  // grpc-js's close cancels the calls still waiting for the channel, and a call starts
  // on the next tick: these failed UNAVAILABLE "Channel closed before call started",
  // marked retryable, and a retry on the client was refused as closed.
  const cold = createClient(target, 'key');
  const first = cold.infer('m', INPUTS);
  cold.close();
  assert.deepEqual(Array.from((await first).X.data), [1]);

  const warm = createClient(target, 'key');
  await warm.infer('m', INPUTS);
  const batch = Promise.all([warm.infer('m', INPUTS), warm.infer('slow', INPUTS)]);
  warm.close();
  for (const outputs of await batch) assert.deepEqual(Array.from(outputs.X.data), [1]);
  const later = await warm.infer('m', INPUTS).catch((e) => e);
  assert.equal(later.details, 'the client was closed');
});

test('a call after close() rejects with MandantError UNAVAILABLE, not retryable', CALLS, async () => {
  const client = createClient(target, 'key');
  await client.infer('m', INPUTS);
  client.close();
  const error = await client.infer('m', INPUTS).catch((e) => e);
  assert.ok(error instanceof MandantError, String(error));
  assert.equal(error.codeName, 'UNAVAILABLE');
  assert.equal(error.details, 'the client was closed');
  assert.equal(error.retryable, false);

  const unused = createClient(target, 'key');
  unused.close();
  const never = await unused.infer('m', INPUTS).catch((e) => e);
  assert.ok(never instanceof MandantError && never.codeName === 'UNAVAILABLE', String(never));
});

test('an API key that cannot be a header value is a TypeError at createClient', CALLS, async () => {
  for (const key of ['clé', 'key\n', 'a\u0000b', 'tab\tkey']) {
    assert.throws(
      () => createClient(target, key),
      (error) => error instanceof TypeError && /^createClient: apiKey may hold only printable ASCII/.test(error.message),
      JSON.stringify(key),
    );
  }
  assert.throws(() => createClient(target, 42), /apiKey is a string/);
  await withClient({}, (client) => client.infer('m', INPUTS), 'printable key:/+=');
  await withClient({}, (client) => client.infer('m', INPUTS), '');
});

test("version 0 and id 0 are sent as '0', not as ''", CALLS, async () => {
  await withClient({}, async (client) => {
    await client.infer('m', INPUTS, { version: 0, id: 0 });
    const request = received.at(-1);
    assert.equal(request.model_version, '0');
    assert.equal(request.id, '0');
    await client.infer('m', INPUTS, { version: '2' });
    assert.equal(received.at(-1).model_version, '2');
    assert.equal(received.at(-1).id, '');
  });
});
