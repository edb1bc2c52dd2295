#!/usr/bin/env node
// Classify image files with a histoserve *encoded* model (`python -m export --encoded`: NAME-encoded)
// over Triton's gRPC API, from Node.js, with nothing but Triton's own protos (protos/, vendored) and
// @grpc/grpc-js. The files are sent as they are: the server decodes and preprocesses them with the
// same code as the Python client, so the answers are the Python client's, to the last digit.
//
//   node classify.js --url HOST:PORT --model digits-encoded [--top-k 3] [--batch-size 16] FILE...
//
// Metrics: with OTEL_METRICS_EXPORTER=otlp (OpenTelemetry's standard variables), the calls it made by
// model, version and gRPC status, and their durations, as the Python client exports them.
//
// One JSON line per file, in input order, as `python -m client classify --json` prints them:
//   {"path": "...", "predictions": [{"label": "3", "index": 3, "score": 0.98}], "error": null}
// A file the server refuses (corrupt, not an image, over a limit) gets an error line and the others
// are still classified. Exit code: 0 every file classified, 1 some failed, 2 the server or model
// could not be used.
//
// The request, for other languages (Go, Java, ...: the same two messages of grpc_service.proto):
//   ModelInferRequest { model_name, inputs: [{ name: "image_file", datatype: "BYTES", shape: [N, 1],
//                       contents: { bytes_contents: [file1, ..., fileN] } }],
//                       outputs: [{ name: "probabilities", parameters: { classification: { int64_param: K } } }] }
//   ModelInferResponse.raw_output_contents[0]: N×K BYTES elements, each a 4-byte little-endian length
//   followed by "score:index:label" (Triton's classification extension).
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { performance } = require("node:perf_hooks");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { metrics } = require("@opentelemetry/api");

const PROTOS = path.join(__dirname, "protos");

// What callers get, as the Python client counts it (histoserve.client.telemetry): the same instruments,
// units and attributes, so the SLO rules read both. Without OTEL_METRICS_EXPORTER nothing is set up and
// the instruments are OpenTelemetry's no-ops. This client does not retry: one attempt per call.
const DURATION_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60];

function callMetrics() {
  const meter = metrics.getMeter("histoserve.client");
  return {
    calls: meter.createCounter("histoserve.client.calls", {
      unit: "{call}", description: "Inference calls, by the gRPC status the caller got after retries" }),
    attempts: meter.createCounter("histoserve.client.attempts", {
      unit: "{attempt}", description: "Inference RPC attempts, by the gRPC status each one got" }),
    duration: meter.createHistogram("histoserve.client.call.duration", {
      unit: "s", description: "Inference call duration, retries included",
      advice: { explicitBucketBoundaries: DURATION_BUCKETS_S } }),
  };
}

// A MeterProvider as OpenTelemetry's standard variables ask (OTEL_METRICS_EXPORTER: otlp or console;
// OTLP over http/protobuf or http/json, endpoint and headers from the exporter's own variables; resource
// from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES), or null when none is asked for.
function configureMetrics(env = process.env) {
  const names = (env.OTEL_METRICS_EXPORTER || "").split(",").map((name) => name.trim()).filter((name) => name && name !== "none");
  if (names.length === 0) return null;
  const { MeterProvider, PeriodicExportingMetricReader, ConsoleMetricExporter } = require("@opentelemetry/sdk-metrics");
  const { detectResources, envDetector, serviceInstanceIdDetector, defaultResource } = require("@opentelemetry/resources");
  const readers = names.map((name) => {
    if (name === "console") return new PeriodicExportingMetricReader({ exporter: new ConsoleMetricExporter() });
    if (name !== "otlp") throw new Error(`OTEL_METRICS_EXPORTER: unknown exporter '${name}' (otlp, console, none)`);
    const protocol = env.OTEL_EXPORTER_OTLP_METRICS_PROTOCOL || env.OTEL_EXPORTER_OTLP_PROTOCOL || "http/protobuf";
    const { OTLPMetricExporter } = protocol === "http/protobuf" ? require("@opentelemetry/exporter-metrics-otlp-proto")
      : protocol === "http/json" ? require("@opentelemetry/exporter-metrics-otlp-http")
        : (() => { throw new Error(`OTEL_EXPORTER_OTLP_PROTOCOL: '${protocol}' is not supported (http/protobuf, http/json)`); })();
    return new PeriodicExportingMetricReader({ exporter: new OTLPMetricExporter() });
  });
  // service.instance.id: a random one of this process's own, unless OTEL_RESOURCE_ATTRIBUTES names one
  // (later detectors win), so that two runs at once never share a series
  const resource = defaultResource().merge(detectResources({ detectors: [serviceInstanceIdDetector, envDetector] }));
  const provider = new MeterProvider({ resource, readers });
  metrics.setGlobalMeterProvider(provider);
  return provider;
}

function usage(message) {
  process.stderr.write(`error: ${message}\nusage: node classify.js --url HOST:PORT --model NAME [--top-k K] [--batch-size N] FILE...\n`);
  process.exit(2);
}

function parseArguments(argv) {
  const options = { url: null, model: null, topK: 3, batchSize: 16, files: [] };  // top-k 3: the Python client's default
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i];
    const value = () => (i + 1 < argv.length ? argv[++i] : usage(`${word} needs a value`));
    if (word === "--url") options.url = value();
    else if (word === "--model") options.model = value();
    else if (word === "--top-k") options.topK = Number(value());
    else if (word === "--batch-size") options.batchSize = Number(value());
    else if (word.startsWith("--")) usage(`unknown option ${word}`);
    else options.files.push(word);
  }
  if (!options.url || !options.model) usage("--url and --model are required");
  for (const [name, number] of [["--top-k", options.topK], ["--batch-size", options.batchSize]]) {
    if (!Number.isInteger(number) || number < 1) usage(`${name} must be a whole number of at least 1`);
  }
  if (options.files.length === 0) usage("no files");
  return options;
}

function inferenceClient(url) {
  const definition = protoLoader.loadSync(path.join(PROTOS, "grpc_service.proto"), {
    includeDirs: [PROTOS], keepCase: true, longs: Number, enums: String, defaults: true,
  });
  const inference = grpc.loadPackageDefinition(definition).inference;
  return new inference.GRPCInferenceService(url, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 256 * 1024 * 1024,
  });
}

function call(client, method, request, deadlineSeconds = 60) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + deadlineSeconds * 1000 }, (error, response) =>
      (error ? reject(error) : resolve(response)));
  });
}

// BYTES tensors in raw form: each element is a uint32 little-endian length, then that many bytes.
function bytesElements(buffer) {
  const elements = [];
  for (let offset = 0; offset < buffer.length;) {
    const length = buffer.readUInt32LE(offset);
    elements.push(buffer.subarray(offset + 4, offset + 4 + length).toString("utf8"));
    offset += 4 + length;
  }
  return elements;
}

function prediction(entry) {
  const [score, index, ...label] = entry.split(":");
  return { label: label.length ? label.join(":") : index, index: Number(index), score: Number(score) };
}

async function classify(client, model, files, topK, instruments) {
  const request = {
    model_name: model,
    inputs: [{ name: "image_file", datatype: "BYTES", shape: [files.length, 1],
               contents: { bytes_contents: files.map((file) => file.data) } }],
    outputs: [{ name: "probabilities", parameters: { classification: { int64_param: topK } } }],
  };
  const started = performance.now();
  let response;
  try {
    response = await call(client, "ModelInfer", request);
  } catch (error) {
    count(instruments, { model, version: "", grpc_code: grpc.status[error.code] || "UNKNOWN" }, started);
    throw error;
  }
  count(instruments, { model, version: response.model_version, grpc_code: "OK" }, started);
  const entries = bytesElements(response.raw_output_contents[0]);
  const perFile = entries.length / files.length;
  return files.map((_, i) => entries.slice(i * perFile, (i + 1) * perFile).map(prediction));
}

function count(instruments, attributes, started) {
  instruments.calls.add(1, attributes);
  instruments.attempts.add(1, attributes);
  instruments.duration.record((performance.now() - started) / 1000, attributes);
}

async function main() {
  const options = parseArguments(process.argv.slice(2));
  let provider;
  try {
    provider = configureMetrics();
  } catch (error) {
    process.stderr.write(`error: ${error.message}\n`);
    return 2;
  }
  try {
    return await classifyAll(options, callMetrics());
  } finally {
    if (provider) await provider.shutdown();  // exports what the periodic reader has not sent yet
  }
}

async function classifyAll(options, instruments) {
  const client = inferenceClient(options.url);
  let metadata;
  try {
    const ready = await call(client, "ModelReady", { name: options.model, version: "" }, 10);
    if (!ready.ready) throw new Error(`model ${options.model} is not ready`);
    metadata = await call(client, "ModelMetadata", { name: options.model, version: "" }, 10);
  } catch (error) {
    process.stderr.write(`error: cannot use ${options.model} at ${options.url}: ${error.details || error.message}\n`);
    return 2;
  }
  if (metadata.inputs.length !== 1 || metadata.inputs[0].datatype !== "BYTES") {
    process.stderr.write(`error: ${options.model} does not take image files (BYTES); use its -encoded twin\n`);
    return 2;
  }
  let failed = 0;
  const print = (file, predictions, error) => {
    failed += error ? 1 : 0;
    process.stdout.write(JSON.stringify({ path: file.path, predictions, error }) + "\n");
  };
  for (let start = 0; start < options.files.length; start += options.batchSize) {
    const batch = options.files.slice(start, start + options.batchSize).map((file) => {
      try {
        return { path: file, data: fs.readFileSync(file) };
      } catch (error) {
        return { path: file, error: `${file}: cannot read (${error.code || error.message})` };
      }
    });
    const readable = batch.filter((file) => !file.error);
    try {
      const rows = readable.length ? await classify(client, options.model, readable, options.topK, instruments) : [];
      readable.forEach((file, i) => { file.predictions = rows[i]; });
    } catch (batchError) {
      // One bad file fails its request: send the batch's files one by one to name it and keep the rest.
      for (const file of readable) {
        try {
          file.predictions = (await classify(client, options.model, [file], options.topK, instruments))[0];
        } catch (error) {
          file.error = `${file.path}: ${error.details || error.message}`;
        }
      }
    }
    batch.forEach((file) => print(file, file.predictions || null, file.error || null));  // in input order
  }
  client.close();
  return failed ? 1 : 0;
}

main().then((code) => process.exit(code), (error) => {
  process.stderr.write(`error: ${error.stack || error}\n`);
  process.exit(2);
});
