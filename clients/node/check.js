#!/usr/bin/env node
'use strict';
// Calls a Mandant server with the Node client and prints one JSON line per call; the
// integration test (tests/integration/test_node_client.py) drives it.
//
//   node check.js <target> <api-key> <model> <inputs-json> [calls]
//
// <inputs-json>: [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]
// Each call prints {"ok": true, "outputs": {NAME: {datatype, shape, array, data}}}, with
// `array` the typed array class the output decoded to (64-bit integers as strings, BYTES
// as UTF-8 strings), or {"ok": false, "code", "codeName", "details", "retryable",
// "retryAfterMs"}.
// The calls run one after another on one connection.

const { createClient, MandantError } = require('./mandant');
const { TYPED_ARRAYS } = require('./tensors');

function toTensor({ name, datatype, shape, data }) {
  if (datatype === 'BYTES') return { name, datatype, shape, data };
  const TypedArray = TYPED_ARRAYS[datatype];
  const is64 = TypedArray === BigInt64Array || TypedArray === BigUint64Array;
  return { name, datatype, shape, data: TypedArray.from(data, is64 ? BigInt : Number) };
}

function describe(outputs) {
  const described = Object.create(null); // an output may be named '__proto__'
  for (const [name, { datatype, shape, data }] of Object.entries(outputs)) {
    const values = Array.isArray(data)
      ? data.map((element) => element.toString('utf8'))
      : Array.from(data, (value) => (typeof value === 'bigint' ? value.toString() : value));
    described[name] = { datatype, shape, array: data.constructor.name, data: values };
  }
  return described;
}

async function main(argv) {
  if (argv.length < 4 || argv.length > 5) {
    process.stderr.write('usage: node check.js <target> <api-key> <model> <inputs-json> [calls]\n');
    return 2;
  }
  const [target, apiKey, model, inputsJson, calls = '1'] = argv;
  const inputs = JSON.parse(inputsJson).map(toTensor);
  const client = createClient(target, apiKey, { timeoutMs: 10000 });
  try {
    for (let index = 0; index < Number(calls); index += 1) {
      try {
        const outputs = await client.infer(model, inputs);
        console.log(JSON.stringify({ ok: true, outputs: describe(outputs) }));
      } catch (error) {
        if (!(error instanceof MandantError)) throw error;
        const { code, codeName, details, retryable, retryAfterMs } = error;
        console.log(JSON.stringify({ ok: false, code, codeName, details, retryable, retryAfterMs }));
      }
    }
  } finally {
    client.close();
  }
  return 0;
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
