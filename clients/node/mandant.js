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
// the server's message (`details`) and, for RESOURCE_EXHAUSTED (rate limit, quota, full
// queue), how long to wait before retrying (`retryAfterMs`, from the
// `grpc-retry-pushback-ms` trailer; null when the server sent none).

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { encode, decodeOutputs } = require('./tensors');

/** The repository's protos/; pass `protoDir` where you copied grpc_service.proto and model_config.proto. */
const DEFAULT_PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
/** Mandant's own limit on a message, both ways (the Python client's too). */
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const PUSHBACK_TRAILER = 'grpc-retry-pushback-ms';
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
  }
}

function pushbackMs(trailers) {
  const values = trailers ? trailers.get(PUSHBACK_TRAILER) : [];
  if (values.length === 0) return null;
  const ms = Number(values[0]);
  return Number.isFinite(ms) && ms >= 0 ? ms : null;
}

function loadService(protoDir) {
  const definition = protoLoader.loadSync(path.join(protoDir, 'grpc_service.proto'), {
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
 * none by default, or when null).
 */
function createClient(target, apiKey, options = {}) {
  const Service = loadService(options.protoDir || DEFAULT_PROTO_DIR);
  const stub = new Service(target, options.credentials || grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  });
  const defaultTimeoutMs = options.timeoutMs;

  // null is "not given", as undefined: Date.now() + null would be a deadline of now. A
  // call's null is the client's timeoutMs, not "no deadline" (README).
  function call(method, request, timeoutMs) {
    const metadata = new grpc.Metadata();
    if (apiKey) metadata.set('authorization', `Bearer ${apiKey}`);
    const deadlineMs = timeoutMs ?? defaultTimeoutMs;
    const callOptions = deadlineMs == null ? {} : { deadline: Date.now() + deadlineMs };
    return new Promise((resolve, reject) => {
      stub[method](request, metadata, callOptions, (error, response) =>
        error ? reject(new MandantError(error)) : resolve(response),
      );
    });
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
          model_version: inferOptions.version || '',
          id: inferOptions.id || '',
          inputs: inputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
          outputs: (inferOptions.outputs || []).map((name) => ({ name })),
          raw_input_contents: inputs.map(encode),
        },
        inferOptions.timeoutMs,
      );
      return decodeOutputs(response);
    },

    close() {
      stub.close();
    },
  };
}

module.exports = { createClient, MandantError, DEFAULT_PROTO_DIR };
