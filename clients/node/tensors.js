'use strict';
// KServe v2 tensors ⇄ JavaScript typed arrays. Pure: no gRPC, no I/O.
//
// A tensor is {name, datatype, shape, data}. `data` is the typed array of its datatype
// (TYPED_ARRAYS below), or for BYTES an array of Buffers/strings. Raw contents are
// little-endian (the protocol's byte order); typed arrays use the machine's, which is
// little-endian on every platform Node ships for (x64, arm64) — checked once below.

const os = require('node:os');

if (os.endianness() !== 'LE') {
  throw new Error('mandant: raw tensor contents are little-endian; this machine is not');
}

/** The typed array class of each fixed-size datatype. FP16 travels as its raw bits. */
const TYPED_ARRAYS = Object.freeze({
  BOOL: Uint8Array,
  UINT8: Uint8Array,
  UINT16: Uint16Array,
  UINT32: Uint32Array,
  UINT64: BigUint64Array,
  INT8: Int8Array,
  INT16: Int16Array,
  INT32: Int32Array,
  INT64: BigInt64Array,
  FP16: Uint16Array,
  FP32: Float32Array,
  FP64: Float64Array,
});

/** Where each datatype's values sit in InferTensorContents (typed, non-raw contents). */
const CONTENTS_FIELDS = Object.freeze({
  BOOL: 'bool_contents',
  UINT8: 'uint_contents',
  UINT16: 'uint_contents',
  UINT32: 'uint_contents',
  UINT64: 'uint64_contents',
  INT8: 'int_contents',
  INT16: 'int_contents',
  INT32: 'int_contents',
  INT64: 'int64_contents',
  FP32: 'fp32_contents',
  FP64: 'fp64_contents',
  BYTES: 'bytes_contents',
});

function elementCount(shape) {
  return shape.reduce((count, dim) => count * Number(dim), 1);
}

/** The raw bytes of one input tensor, a view on `data` where it is a typed array. */
function encode(tensor) {
  const { name, datatype, shape, data } = tensor;
  const count = elementCount(shape);
  if (datatype === 'BYTES') {
    if (!Array.isArray(data) || data.length !== count) {
      throw new TypeError(
        `input ${name}: BYTES data needs an Array of ${count} Buffers or strings, got ${described(data)}`,
      );
    }
    return encodeBytes(data);
  }
  const TypedArray = TYPED_ARRAYS[datatype];
  if (TypedArray === undefined) {
    throw new TypeError(`input ${name}: unknown datatype ${datatype}`);
  }
  // What it needs, then what it got: passed a Float32Array of 2 (or a Float64Array), it
  // said "FP32 data is a Float32Array of 3 elements", as if that were what it was given.
  if (!(data instanceof TypedArray) || data.length !== count) {
    const needs = `${article(TypedArray.name)} ${TypedArray.name} of ${count} element${count === 1 ? '' : 's'}`;
    throw new TypeError(
      `input ${name}: ${datatype} data needs ${needs} (shape ${JSON.stringify(shape)}), got ${described(data)}`,
    );
  }
  // BOOL travels as one byte a value: a Uint8Array holding 2 or 255 went out as is, a
  // bool the server (and Triton) reads as neither true nor false, only as not 0.
  if (datatype === 'BOOL') {
    const index = data.findIndex((value) => value > 1);
    if (index >= 0) {
      throw new TypeError(`input ${name}: BOOL data needs 0 or 1, got ${data[index]} at index ${index}`);
    }
  }
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** What an input's `data` is, for its error: "a Float64Array of 3", "null", "a string". */
function described(data) {
  if (data === null || data === undefined) return String(data);
  if (typeof data !== 'object') return `a ${typeof data}`;
  const kind = (data.constructor && data.constructor.name) || 'Object';
  const what = `${article(kind)} ${kind}`;
  return typeof data.length === 'number' ? `${what} of ${data.length}` : what;
}

/** "an" before Int8Array, Array, Object; "a" before Uint8Array, Float32Array. */
function article(name) {
  return /^[AEIO]/.test(name) ? 'an' : 'a';
}

/** BYTES framing: each element as a 4-byte little-endian length, then its bytes. */
function encodeBytes(elements) {
  const buffers = elements.map((element) => Buffer.from(element));
  const framed = Buffer.allocUnsafe(buffers.reduce((size, b) => size + 4 + b.length, 0));
  let offset = 0;
  for (const element of buffers) {
    offset = framed.writeUInt32LE(element.length, offset);
    offset += element.copy(framed, offset);
  }
  return framed;
}

function decodeBytes(raw, name) {
  const elements = [];
  let offset = 0;
  while (offset < raw.length) {
    if (offset + 4 > raw.length) throw new Error(`output ${name}: truncated BYTES framing`);
    const length = raw.readUInt32LE(offset);
    offset += 4;
    if (offset + length > raw.length) throw new Error(`output ${name}: truncated BYTES framing`);
    elements.push(raw.subarray(offset, offset + length));
    offset += length;
  }
  return elements;
}

/**
 * One output's data from its raw bytes: a typed array that is a view on the response
 * where the bytes are aligned for the element size, a copy where they are not (a
 * typed array cannot start at an unaligned offset).
 */
function decodeRaw(datatype, raw, name) {
  if (datatype === 'BYTES') return decodeBytes(raw, name);
  const TypedArray = TYPED_ARRAYS[datatype];
  if (TypedArray === undefined) throw new TypeError(`output ${name}: unknown datatype ${datatype}`);
  const size = TypedArray.BYTES_PER_ELEMENT;
  if (raw.length % size !== 0) {
    throw new Error(`output ${name}: ${raw.length} bytes is not a whole number of ${datatype}`);
  }
  const bytes = raw.byteOffset % size === 0 ? raw : new Uint8Array(raw);
  return new TypedArray(bytes.buffer, bytes.byteOffset, raw.length / size);
}

/** One output's data from typed (non-raw) contents, as proto-loader gives them. */
function decodeContents(datatype, contents, name) {
  const field = CONTENTS_FIELDS[datatype];
  if (field === undefined) throw new TypeError(`output ${name}: no typed contents for ${datatype}`);
  const values = (contents && contents[field]) || [];
  if (datatype === 'BYTES') return values.map((value) => Buffer.from(value));
  const TypedArray = TYPED_ARRAYS[datatype];
  if (datatype === 'BOOL') return TypedArray.from(values, (value) => (value ? 1 : 0));
  if (datatype === 'INT64' || datatype === 'UINT64') return TypedArray.from(values, BigInt);
  return TypedArray.from(values, Number);
}

/**
 * The outputs of a ModelInferResponse as {name: {datatype, shape, data}}, an object
 * without a prototype: every name is an own key, '__proto__' or 'constructor' too
 * (`outputs[name] = ...` on a {} would make an output named '__proto__' its prototype).
 */
function decodeOutputs(response) {
  const raw = response.raw_output_contents || [];
  const outputs = Object.create(null);
  response.outputs.forEach((output, index) => {
    const { name, datatype } = output;
    if (raw.length > 0 && raw[index] === undefined) {
      throw new Error(`output ${name}: no raw contents (${raw.length} for ${response.outputs.length} outputs)`);
    }
    const data =
      raw.length > 0
        ? decodeRaw(datatype, raw[index], name)
        : decodeContents(datatype, output.contents, name);
    const shape = output.shape.map(Number);
    // As the Python client: data that does not fill its shape is the server's error
    // (a [2, 2] output of 4 bytes came back as one element, no error).
    if (data.length !== elementCount(shape)) {
      throw new Error(
        `output ${name}: shape ${JSON.stringify(shape)} needs ${elementCount(shape)} elements, got ${data.length}`,
      );
    }
    outputs[name] = { datatype, shape, data };
  });
  return outputs;
}

module.exports = { TYPED_ARRAYS, encode, decodeOutputs, decodeRaw };
