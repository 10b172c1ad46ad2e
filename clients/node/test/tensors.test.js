'use strict';
// The codec alone (no server): what a real server cannot be made to send on demand.
const assert = require('node:assert/strict');
const { test } = require('node:test');
const { encode, decodeOutputs, decodeRaw } = require('../tensors');

test('an input is sent as a view on its typed array, not a copy', () => {
  const data = new Float32Array([1.5, -2, 3, 4]);
  const raw = encode({ name: 'X', datatype: 'FP32', shape: [2, 2], data });
  assert.equal(raw.buffer, data.buffer);
  assert.deepEqual([...raw], [...new Uint8Array(data.buffer)]);
});

test('an input whose array does not match its datatype or shape is refused: needed, then got', () => {
  // Given a Float32Array of 2 (or a Float64Array) for FP32 [1, 3], it said "FP32 data is a
  // Float32Array of 3 elements", as if that were what it was given.
  const refusal = (tensor) => {
    try {
      encode({ name: 'INPUT0', ...tensor });
    } catch (error) {
      assert.ok(error instanceof TypeError);
      return error.message;
    }
    assert.fail('not refused');
  };
  const fp32 = { datatype: 'FP32', shape: [1, 3] };
  const needs = 'input INPUT0: FP32 data needs a Float32Array of 3 elements (shape [1,3])';
  assert.equal(refusal({ ...fp32, data: new Float32Array(2) }), `${needs}, got a Float32Array of 2`);
  assert.equal(refusal({ ...fp32, data: new Float64Array(3) }), `${needs}, got a Float64Array of 3`);
  assert.equal(refusal({ ...fp32, data: [1, 2, 3] }), `${needs}, got an Array of 3`);
  assert.equal(refusal({ ...fp32, data: undefined }), `${needs}, got undefined`);
  assert.equal(
    refusal({ datatype: 'INT8', shape: [1], data: new Uint8Array(1) }),
    'input INPUT0: INT8 data needs an Int8Array of 1 element (shape [1]), got a Uint8Array of 1',
  );
  assert.equal(
    refusal({ datatype: 'BYTES', shape: [2], data: ['a'] }),
    'input INPUT0: BYTES data needs an Array of 2 Buffers or strings, got an Array of 1',
  );
  assert.equal(
    refusal({ datatype: 'BYTES', shape: [1], data: 'a' }),
    'input INPUT0: BYTES data needs an Array of 1 Buffers or strings, got a string',
  );
  assert.match(refusal({ datatype: 'FP8', shape: [1], data: new Float32Array(1) }), /unknown datatype FP8/);
});

test('aligned raw output is a view on the response; unaligned raw output is copied', () => {
  const values = new Float64Array([0.25, -1e300]);
  const response = Buffer.alloc(17);
  Buffer.from(values.buffer).copy(response, 1);
  const unaligned = response.subarray(1);
  const copied = decodeRaw('FP64', unaligned, 'Y');
  assert.deepEqual([...copied], [...values]);
  assert.notEqual(copied.buffer, response.buffer);

  const aligned = Buffer.from(values.buffer);
  const viewed = decodeRaw('FP64', aligned, 'Y');
  assert.equal(viewed.buffer, values.buffer);
  assert.ok(viewed instanceof Float64Array);
});

test('raw output that is not a whole number of elements is an error', () => {
  assert.throws(() => decodeRaw('INT32', Buffer.alloc(6), 'Y'), /not a whole number of INT32/);
});

test('BYTES elements are framed with little-endian lengths and unframed back', () => {
  const raw = encode({ name: 'S', datatype: 'BYTES', shape: [3], data: ['ab', Buffer.from([0, 255]), ''] });
  assert.deepEqual([...raw], [2, 0, 0, 0, 97, 98, 2, 0, 0, 0, 0, 255, 0, 0, 0, 0]);
  const back = decodeRaw('BYTES', raw, 'S');
  assert.deepEqual(back.map((b) => [...b]), [[97, 98], [0, 255], []]);
  assert.throws(() => decodeRaw('BYTES', raw.subarray(0, 5), 'S'), /truncated BYTES framing/);
});

test('typed contents decode by datatype, 64-bit integers exactly', () => {
  const outputs = decodeOutputs({
    outputs: [
      { name: 'A', datatype: 'INT64', shape: ['2'], contents: { int64_contents: ['9007199254740993', '-1'] } },
      { name: 'B', datatype: 'BOOL', shape: ['2'], contents: { bool_contents: [true, false] } },
    ],
    raw_output_contents: [],
  });
  assert.deepEqual(outputs.A.shape, [2]);
  assert.deepEqual([...outputs.A.data], [9007199254740993n, -1n]);
  assert.ok(outputs.B.data instanceof Uint8Array);
  assert.deepEqual([...outputs.B.data], [1, 0]);
});

test("an output named '__proto__' is an own key of the outputs, not their prototype", () => {
  const int32 = (value) => Buffer.from(new Int32Array([value]).buffer);
  const outputs = decodeOutputs({
    outputs: [
      { name: '__proto__', datatype: 'INT32', shape: ['1'] },
      { name: 'constructor', datatype: 'INT32', shape: ['1'] },
      { name: 'OTHER', datatype: 'INT32', shape: ['1'] },
    ],
    raw_output_contents: [int32(7), int32(8), int32(9)],
  });
  assert.deepEqual(Object.keys(outputs), ['__proto__', 'constructor', 'OTHER']);
  assert.ok(Object.hasOwn(outputs, '__proto__'));
  assert.deepEqual([...outputs['__proto__'].data], [7]);
  assert.deepEqual([...outputs.constructor.data], [8]);
  assert.equal(Object.getPrototypeOf(outputs), null);
});

test('output data that does not fill its shape is an error, raw, BYTES or typed', () => {
  const float32 = Buffer.from(new Float32Array([1]).buffer);
  const bytes = encode({ name: 'S', datatype: 'BYTES', shape: [1], data: ['a'] });
  const cases = [
    { name: 'Y', datatype: 'FP32', shape: ['2', '2'], raw: float32 },
    { name: 'S', datatype: 'BYTES', shape: ['3'], raw: bytes },
  ];
  for (const { raw, ...output } of cases) {
    assert.throws(
      () => decodeOutputs({ outputs: [output], raw_output_contents: [raw] }),
      /needs \d+ elements, got 1/,
    );
  }
  const typed = { name: 'T', datatype: 'INT32', shape: ['2'], contents: { int_contents: [1] } };
  assert.throws(
    () => decodeOutputs({ outputs: [typed], raw_output_contents: [] }),
    /needs 2 elements, got 1/,
  );
});

test('BOOL input values other than 0 or 1 are refused before sending', () => {
  const ok = encode({ name: 'B', datatype: 'BOOL', shape: [3], data: Uint8Array.of(1, 0, 1) });
  assert.deepEqual([...ok], [1, 0, 1]);
  assert.throws(
    () => encode({ name: 'B', datatype: 'BOOL', shape: [3], data: Uint8Array.of(1, 0, 2) }),
    /input B: BOOL data needs 0 or 1, got 2 at index 2/,
  );
});
