'use strict';
// A small Node.js client for Mandant's KServe v2 gRPC API (inference.GRPCInferenceService),
// built at run time from protos/grpc_service.proto with @grpc/proto-loader.
//
//   const { createClient } = require('./mandant');
//   const client = createClient('127.0.0.1:8001', process.env.MANDANT_API_KEY);
//   const outputs = await client.infer('echo', [
//     { name: 'INPUT0', datatype: 'FP32', shape: [1, 4], data: new Float32Array([1, 2, 3, 4]) },
//   ]);
//   outputs.OUTPUT0.data; // Float32Array [1, 2, 3, 4]
//   client.close();
//
// Every failed call rejects with a MandantError: the gRPC status (`code`, `codeName`),
// the server's message (`details`), whether the same call may pass later (`retryable`)
// and, for RESOURCE_EXHAUSTED (rate limit, quota, full queue), how long to wait before
// retrying (`retryAfterMs`, from the `grpc-retry-pushback-ms` trailer; null when the
// server sent none). A bad argument (inputs, options, API key) is a TypeError instead.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { encode, decodeOutputs } = require('./tensors');

/** The repository's protos/; pass `protoDir` where you copied grpc_service.proto and model_config.proto. */
const DEFAULT_PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
/** Mandant's own limit on a message, both ways (the Python client's too). */
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const PUSHBACK_TRAILER = 'grpc-retry-pushback-ms';
/**
 * The longest deadline a call gets: gRPC's grpc-timeout header holds at most 8 digits
 * of a unit, and grpc-js throws (inside its own promise chain: an unhandled rejection
 * that ends the process) for a deadline beyond 99999999 hours. A longer finite
 * timeoutMs is clamped to this (about 3 years); Infinity is no deadline at all.
 */
const MAX_TIMEOUT_MS = 99999999 * 1000;
/**
 * gRPC's RESOURCE_EXHAUSTED for a message over a size limit, on either side (grpc-js:
 * "Attempted to send message with a size larger than N", "Received message larger than
 * max (N vs. M)"; a server's "Received message larger than max …"): the same call fails
 * the same way every time, so unlike a rate limit it is not retryable (the Python
 * client's InvalidInput).
 */
const MESSAGE_TOO_LARGE = /message larger than max|message with a size larger than/i;
/** What a header value may hold (grpc-js refuses anything else, with a plain Error). */
const HEADER_VALUE = /^[\x20-\x7e]*$/;
const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).filter(([, code]) => typeof code === 'number').map(([n, c]) => [c, n]),
);

class MandantError extends Error {
  constructor(serviceError) {
    const code = serviceError.code;
    const codeName = STATUS_NAMES[code] || `STATUS_${code}`;
    super(`${codeName}: ${serviceError.details}`, { cause: serviceError });
    this.name = 'MandantError';
    this.code = code;
    this.codeName = codeName;
    this.details = serviceError.details;
    this.retryAfterMs = pushbackMs(serviceError.metadata);
    // A later try may pass: RESOURCE_EXHAUSTED (rate limit, concurrency cap, full queue,
    // quota; wait retryAfterMs when given) but not for a message over the size limit,
    // and UNAVAILABLE from the channel or server but not for a closed client.
    this.retryable =
      (code === grpc.status.RESOURCE_EXHAUSTED && !MESSAGE_TOO_LARGE.test(this.details || '')) ||
      (code === grpc.status.UNAVAILABLE && !serviceError.clientClosed);
  }
}

/** The MandantError of a call made after close() (as the Python client's Unavailable). */
function clientClosedError() {
  return new MandantError({
    code: grpc.status.UNAVAILABLE,
    details: 'the client was closed',
    clientClosed: true,
  });
}

/**
 * `timeoutMs` checked: undefined or null (not given), 0 or more (Infinity: no deadline;
 * a finite one above MAX_TIMEOUT_MS is clamped to it). Anything else — NaN (e.g.
 * Number(process.env.UNSET)), a negative number, a string — is a TypeError.
 */
function checkTimeoutMs(timeoutMs, where) {
  if (timeoutMs == null) return timeoutMs;
  if (typeof timeoutMs !== 'number' || Number.isNaN(timeoutMs) || timeoutMs < 0) {
    const shown = typeof timeoutMs === 'string' ? JSON.stringify(timeoutMs) : String(timeoutMs);
    throw new TypeError(
      `${where} timeoutMs is a number of milliseconds, 0 or more (Infinity: no deadline), or null; got ${typeof timeoutMs} ${shown}`,
    );
  }
  return Number.isFinite(timeoutMs) ? Math.min(timeoutMs, MAX_TIMEOUT_MS) : timeoutMs;
}

/** The authorization header value for `apiKey`, or null without one. */
function authorization(apiKey) {
  if (apiKey == null || apiKey === '') return null;
  if (typeof apiKey !== 'string') {
    throw new TypeError(`createClient: apiKey is a string; got ${typeof apiKey}`);
  }
  const value = `Bearer ${apiKey}`;
  if (!HEADER_VALUE.test(value)) {
    throw new TypeError(
      'createClient: apiKey may hold only printable ASCII characters (a gRPC header value): no newline, control or non-ASCII character',
    );
  }
  return value;
}

function pushbackMs(trailers) {
  const values = trailers ? trailers.get(PUSHBACK_TRAILER) : [];
  if (values.length === 0) return null;
  const ms = Number(values[0]);
  return Number.isFinite(ms) && ms >= 0 ? ms : null;
}

function loadService(protoDir) {
  // Named relative to its include directory: a relative protoDir, joined to the name
  // too, was looked for inside itself and warned "not found in any of the include paths".
  const definition = protoLoader.loadSync('grpc_service.proto', {
    includeDirs: [protoDir], // grpc_service.proto imports model_config.proto
    keepCase: true, // field names as in the proto: raw_input_contents, model_name, ...
    longs: String, // int64 shapes and contents without loss; converted in tensors.js
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).inference.GRPCInferenceService;
}

/**
 * A client for one Mandant server. `target` is host:port; `apiKey` goes in every call's
 * `authorization: Bearer` header. Options: `credentials` (grpc.credentials.createSsl(...)
 * for TLS; insecure by default), `protoDir`, `timeoutMs` (a deadline for every call;
 * none by default, or when null or Infinity). An API key that cannot be a header value
 * or a timeoutMs that is not 0 or more (NaN, negative, a string) throws a TypeError.
 */
function createClient(target, apiKey, options = {}) {
  const header = authorization(apiKey);
  const defaultTimeoutMs = checkTimeoutMs(options.timeoutMs, 'createClient:');
  const Service = loadService(options.protoDir || DEFAULT_PROTO_DIR);
  const stub = new Service(target, options.credentials || grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  });
  let closed = false;
  // Calls not answered yet: close() closes the channel once they are (grpc-js's close
  // cancels every call still waiting for the channel to connect, and a call starts on
  // the next tick: one made just before close() failed "Channel closed before call
  // started").
  let pending = 0;
  function settled() {
    pending -= 1;
    if (closed && pending === 0) stub.close();
  }

  // null is "not given", as undefined: Date.now() + null would be a deadline of now. A
  // call's null is the client's timeoutMs, not "no deadline" (README). A bad timeoutMs
  // rejects the call with a TypeError before anything is sent.
  function call(method, request, timeoutMs) {
    let deadlineMs;
    try {
      deadlineMs = checkTimeoutMs(timeoutMs, `${method}:`) ?? defaultTimeoutMs;
    } catch (error) {
      return Promise.reject(error);
    }
    if (closed) return Promise.reject(clientClosedError());
    const metadata = new grpc.Metadata();
    if (header !== null) metadata.set('authorization', header);
    const callOptions = deadlineMs == null ? {} : { deadline: Date.now() + deadlineMs };
    pending += 1;
    return new Promise((resolve, reject) => {
      stub[method](request, metadata, callOptions, (error, response) =>
        error ? reject(new MandantError(error)) : resolve(response),
      );
    }).finally(settled);
  }

  return {
    /**
     * Run `model` on `inputs` ([{name, datatype, shape, data}], data a typed array or,
     * for BYTES, an array of Buffers/strings), sent as raw_input_contents. Resolves to
     * {OUTPUT_NAME: {datatype, shape, data}} with data a typed array of the datatype.
     * Options: `version`, `outputs` (names to return; all by default), `id`, `timeoutMs`
     * (absent or null: the client's).
     */
    async infer(model, inputs, inferOptions = {}) {
      const response = await call(
        'ModelInfer',
        {
          model_name: model,
          model_version: String(inferOptions.version ?? ''), // version 0 is '0', not ''
          id: String(inferOptions.id ?? ''),
          inputs: inputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
          outputs: (inferOptions.outputs || []).map((name) => ({ name })),
          raw_input_contents: inputs.map(encode),
        },
        inferOptions.timeoutMs,
      );
      return decodeOutputs(response);
    },

    /** Closes the channel once the calls made before are answered (at once if there
     * are none); a later call rejects with UNAVAILABLE "the client was closed". */
    close() {
      if (closed) return;
      closed = true;
      if (pending === 0) stub.close();
    },
  };
}

module.exports = { createClient, MandantError, DEFAULT_PROTO_DIR, MAX_TIMEOUT_MS };
