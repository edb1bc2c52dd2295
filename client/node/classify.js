#!/usr/bin/env node
// Classify image files with a histoserve *encoded* model (`python -m histoserve.export --encoded`: NAME-encoded)
// over Triton's gRPC API, from Node.js, with nothing but Triton's own protos (protos/, vendored) and
// @grpc/grpc-js. The files are sent as they are: the server decodes and preprocesses them with the
// same code as the Python client, so the answers are the Python client's, to the last digit.
//
//   node classify.js --url HOST:PORT --model digits-encoded [--top-k 3] [--batch-size 16]
//                    [--ssl [--ssl-root-certificates CA.pem] [--ssl-private-key KEY.pem --ssl-certificate-chain CERT.pem]]
//                    FILE...
//
// TLS: the Python client's options and meaning (formats/options.py): --ssl for TLS (the server checked
// against --ssl-root-certificates, or the system's CAs); --ssl-private-key and --ssl-certificate-chain,
// both, for mutual TLS (a gateway that asks for client certificates). Any of the files implies --ssl.
//
// Metrics: with OTEL_METRICS_EXPORTER=otlp (OpenTelemetry's standard variables), the calls it made by
// model, version and gRPC status, and their durations, as the Python client exports them.
//
// Traces: with OTEL_TRACES_EXPORTER=otlp (or console, to stderr), the Python client's spans: one
// `histoserve.classify` per request, a `histoserve.read_file` per file and an
// `inference.GRPCInferenceService/ModelInfer` per RPC, whose context goes to Triton as `traceparent`
// gRPC metadata, so that Triton's spans of the request join the same trace. Endpoint, headers, sampler
// (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG) and resource from OpenTelemetry's standard variables.
// Unset (or `none`): no tracer provider, nothing exported, no traceparent sent.
//
// One JSON line per file, in input order, as `python -m histoserve.client classify --json` prints them:
//   {"path": "...", "predictions": [{"label": "3", "index": 3, "score": 0.98}], "error": null, "trace_id": "4bf9..."}
// trace_id: the trace of the file's request (32 hex digits), null when it is not traced.
// A file the server refuses (corrupt, not an image, over a limit) gets an error line and the others
// are still classified. Exit code: 0 every file classified, 1 some failed, 2 the server or model
// could not be used (or an option is wrong).
//
// As a library (require("./classify.js")): classifyFiles() starts its spans under the caller's active
// span (context.active()) with whatever OpenTelemetry the caller set up, through @opentelemetry/api
// alone; nothing is configured unless the command line runs.
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
const util = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { context, metrics, trace, defaultTextMapSetter, isSpanContextValid, SpanKind, SpanStatusCode, TraceFlags } = require("@opentelemetry/api");

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

// The names of the exporters an OTEL_*_EXPORTER variable asks for ([] when unset, "none", or with
// OTEL_SDK_DISABLED=true).
function exporterNames(env, variable) {
  if ((env.OTEL_SDK_DISABLED || "").trim().toLowerCase() === "true") return [];
  return (env[variable] || "").split(",").map((name) => name.trim()).filter((name) => name && name !== "none");
}

function otlpProtocol(env, signal) {
  const protocol = env[`OTEL_EXPORTER_OTLP_${signal}_PROTOCOL`] || env.OTEL_EXPORTER_OTLP_PROTOCOL || "http/protobuf";
  if (protocol !== "http/protobuf" && protocol !== "http/json") {
    throw new Error(`OTEL_EXPORTER_OTLP_PROTOCOL: '${protocol}' is not supported (http/protobuf, http/json)`);
  }
  return protocol;
}

// One resource for metrics and traces: service.name from OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
// and a service.instance.id, a random one of this process's own unless OTEL_RESOURCE_ATTRIBUTES names
// one (later detectors win), so that two runs at once never share a series.
let processResource = null;
function telemetryResource() {
  if (!processResource) {
    const { detectResources, envDetector, serviceInstanceIdDetector, defaultResource } = require("@opentelemetry/resources");
    processResource = defaultResource().merge(detectResources({ detectors: [serviceInstanceIdDetector, envDetector] }));
  }
  return processResource;
}

// A MeterProvider as OpenTelemetry's standard variables ask (OTEL_METRICS_EXPORTER: otlp or console;
// OTLP over http/protobuf or http/json, endpoint and headers from the exporter's own variables; resource
// from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES), or null when none is asked for.
function configureMetrics(env = process.env) {
  const names = exporterNames(env, "OTEL_METRICS_EXPORTER");
  if (names.length === 0) return null;
  const { MeterProvider, PeriodicExportingMetricReader, ConsoleMetricExporter } = require("@opentelemetry/sdk-metrics");
  const readers = names.map((name) => {
    if (name === "console") return new PeriodicExportingMetricReader({ exporter: new ConsoleMetricExporter() });
    if (name !== "otlp") throw new Error(`OTEL_METRICS_EXPORTER: unknown exporter '${name}' (otlp, console, none)`);
    const { OTLPMetricExporter } = otlpProtocol(env, "METRICS") === "http/protobuf"
      ? require("@opentelemetry/exporter-metrics-otlp-proto") : require("@opentelemetry/exporter-metrics-otlp-http");
    return new PeriodicExportingMetricReader({ exporter: new OTLPMetricExporter() });
  });
  const provider = new MeterProvider({ resource: telemetryResource(), readers });
  metrics.setGlobalMeterProvider(provider);
  return provider;
}

// A TracerProvider as OpenTelemetry's standard variables ask, made the global one, or null when
// OTEL_TRACES_EXPORTER names none (then the API's tracer is a no-op: no span is recorded, nothing is
// exported, no traceparent is sent). Exporters: otlp (http/protobuf or http/json per
// OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL; endpoint, headers, timeout,
// compression and certificates read by the exporter itself from its own variables), console (to stderr:
// stdout holds the result lines). Batched as OTEL_BSP_* ask; sampled as OTEL_TRACES_SAMPLER asks; the
// resource is the metrics'. Call shutdown() before exiting: it exports what is still queued.
function configureTracing(env = process.env) {
  const names = exporterNames(env, "OTEL_TRACES_EXPORTER");
  if (names.length === 0) return null;
  const { TracerProvider, BatchSpanProcessor } = require("@opentelemetry/sdk-trace");
  const number = (name) => {  // undefined when unset: the processor's default
    const text = (env[name] || "").trim();
    if (text === "") return undefined;
    if (!(Number(text) >= 0)) throw new Error(`${name}: '${text}' is not a number of at least 0`);
    return Number(text);
  };
  const batching = {
    scheduledDelayMillis: number("OTEL_BSP_SCHEDULE_DELAY"), exportTimeoutMillis: number("OTEL_BSP_EXPORT_TIMEOUT"),
    maxQueueSize: number("OTEL_BSP_MAX_QUEUE_SIZE"), maxExportBatchSize: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
  };
  const spanProcessors = names.map((name) => {
    if (name === "console") return new BatchSpanProcessor({ exporter: stderrSpanExporter(), ...batching });
    if (name !== "otlp") throw new Error(`OTEL_TRACES_EXPORTER: unknown exporter '${name}' (otlp, console, none)`);
    const { OTLPTraceExporter } = otlpProtocol(env, "TRACES") === "http/protobuf"
      ? require("@opentelemetry/exporter-trace-otlp-proto") : require("@opentelemetry/exporter-trace-otlp-http");
    return new BatchSpanProcessor({ exporter: new OTLPTraceExporter(), ...batching });
  });
  const provider = new TracerProvider({ resource: telemetryResource(), sampler: samplerFrom(env), spanProcessors });
  trace.setGlobalTracerProvider(provider);
  return provider;
}

// OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, which the SDK (2.x) no longer reads itself: the
// standard samplers, parentbased_always_on by default.
function samplerFrom(env) {
  const { AlwaysOnSampler, AlwaysOffSampler, ParentBasedSampler, TraceIdRatioBasedSampler } = require("@opentelemetry/sdk-trace");
  const name = (env.OTEL_TRACES_SAMPLER || "parentbased_always_on").trim().toLowerCase();
  const ratio = () => {
    const text = (env.OTEL_TRACES_SAMPLER_ARG || "").trim();
    const value = text === "" ? 1 : Number(text);
    if (!(value >= 0 && value <= 1)) throw new Error(`OTEL_TRACES_SAMPLER_ARG: '${text}' is not a ratio in [0, 1]`);
    return new TraceIdRatioBasedSampler(value);
  };
  const samplers = {
    always_on: () => new AlwaysOnSampler(),
    always_off: () => new AlwaysOffSampler(),
    traceidratio: ratio,
    parentbased_always_on: () => new ParentBasedSampler({ root: new AlwaysOnSampler() }),
    parentbased_always_off: () => new ParentBasedSampler({ root: new AlwaysOffSampler() }),
    parentbased_traceidratio: () => new ParentBasedSampler({ root: ratio() }),
  };
  if (!Object.hasOwn(samplers, name)) {
    throw new Error(`OTEL_TRACES_SAMPLER: '${name}' is not supported (${Object.keys(samplers).join(", ")})`);
  }
  return samplers[name]();
}

// OpenTelemetry's console exporter writes to stdout, where the result lines go: this one, to stderr.
function stderrSpanExporter() {
  const { ExportResultCode, hrTimeToMicroseconds } = require("@opentelemetry/core");
  return {
    export(spans, done) {
      for (const span of spans) {
        const { traceId, spanId } = span.spanContext();
        process.stderr.write(util.inspect({
          traceId, parentSpanId: span.parentSpanContext?.spanId, id: spanId, name: span.name, kind: span.kind,
          timestamp: hrTimeToMicroseconds(span.startTime), duration: hrTimeToMicroseconds(span.duration),
          attributes: span.attributes, status: span.status,
        }, { depth: 4, breakLength: 120 }) + "\n");
      }
      done({ code: ExportResultCode.SUCCESS });
    },
    forceFlush: () => Promise.resolve(),
    shutdown: () => Promise.resolve(),
  };
}

function usage(message) {
  process.stderr.write(`error: ${message}\nusage: node classify.js --url HOST:PORT --model NAME [--top-k K] [--batch-size N] ` +
    "[--ssl] [--ssl-root-certificates FILE] [--ssl-private-key FILE --ssl-certificate-chain FILE] FILE...\n");
  process.exit(2);
}

const TLS_FILE_OPTIONS = {
  "--ssl-root-certificates": "sslRootCertificates",
  "--ssl-private-key": "sslPrivateKey",
  "--ssl-certificate-chain": "sslCertificateChain",
};

function parseArguments(argv) {
  const options = {  // top-k 3: the Python client's default
    url: null, model: null, topK: 3, batchSize: 16, files: [],
    ssl: false, sslRootCertificates: null, sslPrivateKey: null, sslCertificateChain: null,
  };
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i];
    const value = () => (i + 1 < argv.length ? argv[++i] : usage(`${word} needs a value`));
    if (word === "--url") options.url = value();
    else if (word === "--model") options.model = value();
    else if (word === "--top-k") options.topK = Number(value());
    else if (word === "--batch-size") options.batchSize = Number(value());
    else if (word === "--ssl") options.ssl = true;
    else if (Object.hasOwn(TLS_FILE_OPTIONS, word)) options[TLS_FILE_OPTIONS[word]] = value();
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

// gRPC channel credentials from the TLS options, as the Python client reads them (formats/options.py
// ClientTls): plaintext unless --ssl or a file is given; the root certificates default to the system's;
// a client identity needs both its key and its chain. Throws Error naming the option and the file.
function channelCredentials({ ssl, sslRootCertificates, sslPrivateKey, sslCertificateChain }) {
  if (!(ssl || sslRootCertificates || sslPrivateKey || sslCertificateChain)) return grpc.credentials.createInsecure();
  const problems = [];
  if (Boolean(sslPrivateKey) !== Boolean(sslCertificateChain)) {
    problems.push("mutual TLS needs both --ssl-private-key and --ssl-certificate-chain");
  }
  const read = (option, file) => {
    if (!file) return null;
    try {
      return fs.readFileSync(file);
    } catch (error) {
      problems.push(error.code === "ENOENT" ? `${option}: no such file: ${file}` : `${option}: cannot read ${file} (${error.code || error.message})`);
      return null;
    }
  };
  const files = [read("--ssl-root-certificates", sslRootCertificates), read("--ssl-private-key", sslPrivateKey),
    read("--ssl-certificate-chain", sslCertificateChain)];
  if (problems.length) throw new Error(problems.join("; "));
  try {
    return grpc.credentials.createSsl(...files);
  } catch (error) {  // not PEM, or a key that is not the chain's
    throw new Error(`--ssl-root-certificates/--ssl-private-key/--ssl-certificate-chain: unusable: ${error.message}`);
  }
}

function inferenceClient(url, credentials = grpc.credentials.createInsecure()) {
  const definition = protoLoader.loadSync(path.join(PROTOS, "grpc_service.proto"), {
    includeDirs: [PROTOS], keepCase: true, longs: Number, enums: String, defaults: true,
  });
  const inference = grpc.loadPackageDefinition(definition).inference;
  return new inference.GRPCInferenceService(url, credentials, {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 256 * 1024 * 1024,
  });
}

function call(client, method, request, deadlineSeconds = 60, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + deadlineSeconds * 1000 }, (error, response) =>
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

// The spans, as the Python client makes them (same names, kinds and attributes):
//   histoserve.classify                           one per request (a batch of files)
//     histoserve.read_file                        one per file; ERROR with the reason for one that cannot be read
//     inference.GRPCInferenceService/ModelInfer   one per RPC (CLIENT); its context is sent to Triton
//     histoserve.classify                         when the request failed: each of its files sent alone,
//       inference.GRPCInferenceService/ModelInfer   a request of its own, in the same trace
// With no tracer provider set up, they are the API's no-op spans: nothing recorded, nothing sent.
const TRACER = "histoserve.client";
const SERVICE = "inference.GRPCInferenceService";

// Sampled: a back end will have the span (and its trace id means something). Without a tracer provider
// a span is never sampled, unless the caller's context carries a sampled trace from upstream (then the
// API passes that context through, and so do we, as the Python client does).
function sampled(span) {
  const spanContext = span.spanContext();
  return isSpanContextValid(spanContext) && (spanContext.traceFlags & TraceFlags.SAMPLED) !== 0;
}

let w3cPropagator = null;

// The span's W3C trace context (traceparent, tracestate) as gRPC metadata, for Triton to continue the
// trace. Only for a sampled span: Triton (2.51; src/tracer.cc: `if (span_context.IsValid())
// force_sample = true`) traces every request that carries a valid traceparent whatever its sampled
// flag, so sending unsampled contexts would have Triton trace every request. Triton reads W3C trace
// context only, hence this propagator rather than whichever the process registered.
function traceMetadata(span, parent) {
  const metadata = new grpc.Metadata();
  if (!sampled(span)) return metadata;
  if (!w3cPropagator) w3cPropagator = new (require("@opentelemetry/core").W3CTraceContextPropagator)();
  const carrier = {};
  w3cPropagator.inject(trace.setSpan(parent, span), carrier, defaultTextMapSetter);
  for (const [key, value] of Object.entries(carrier)) metadata.set(key, value);
  return metadata;
}

// The host of a --url (HOST:PORT, [IPv6]:PORT, dns:///HOST:PORT): the spans' server.address.
function serverAddress(url) {
  const target = url.replace(/^[a-z][a-z0-9+.-]*:\/\/[^/]*\//i, "");
  const colon = target.lastIndexOf(":");
  return (colon > 0 && !target.endsWith("]") ? target.slice(0, colon) : target).replace(/^\[(.*)\]$/, "$1");
}

// One ModelInfer RPC for `files` (each {path, data}), under `parent`: top-k rows per file, in order.
async function classify(client, target, files, topK, instruments, parent = context.active()) {
  const { model, url } = target;
  const request = {
    model_name: model,
    inputs: [{ name: "image_file", datatype: "BYTES", shape: [files.length, 1],
               contents: { bytes_contents: files.map((file) => file.data) } }],
    outputs: [{ name: "probabilities", parameters: { classification: { int64_param: topK } } }],
  };
  const span = trace.getTracer(TRACER).startSpan(`${SERVICE}/ModelInfer`, {
    kind: SpanKind.CLIENT,
    attributes: { "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "ModelInfer",
                  "server.address": serverAddress(url), "histoserve.model": model },
  }, parent);
  const started = performance.now();
  let response;
  try {
    response = await call(client, "ModelInfer", request, 60, traceMetadata(span, parent));
  } catch (error) {
    count(instruments, { model, version: "", grpc_code: grpc.status[error.code] || "UNKNOWN" }, started);
    const code = Number.isInteger(error.code) ? error.code : grpc.status.UNKNOWN;
    span.setAttribute("rpc.grpc.status_code", code);
    span.setStatus({ code: SpanStatusCode.ERROR, message: `${grpc.status[code] || "UNKNOWN"}: ${error.details || error.message}` });
    span.end();
    throw error;
  }
  count(instruments, { model, version: response.model_version, grpc_code: "OK" }, started);
  span.setAttributes({ "rpc.grpc.status_code": grpc.status.OK, "histoserve.model.version": response.model_version });
  span.end();
  const entries = bytesElements(response.raw_output_contents[0]);
  const perFile = entries.length / files.length;
  return files.map((_, i) => entries.slice(i * perFile, (i + 1) * perFile).map(prediction));
}

function count(instruments, attributes, started) {
  instruments.calls.add(1, attributes);
  instruments.attempts.add(1, attributes);
  instruments.duration.record((performance.now() - started) / 1000, attributes);
}

function readFile(file, parent) {
  const span = trace.getTracer(TRACER).startSpan("histoserve.read_file", { attributes: { "file.path": file } }, parent);
  try {
    return { path: file, data: fs.readFileSync(file) };
  } catch (error) {
    const reason = `cannot read (${error.code || error.message})`;
    span.setStatus({ code: SpanStatusCode.ERROR, message: reason });
    return { path: file, error: `${file}: ${reason}` };
  } finally {
    span.end();
  }
}

async function inSpan(parent, attributes, work) {
  const span = trace.getTracer(TRACER).startSpan("histoserve.classify", { kind: SpanKind.INTERNAL, attributes }, parent);
  try {
    return await work(span, trace.setSpan(parent, span));
  } finally {
    span.end();
  }
}

// Classify `paths` in one request, under the caller's active span (or `parent`): one result per path,
// in order, {path, predictions, error, trace_id}. A file that cannot be read gets its error and is not
// sent; when the request fails, its files are sent one by one to name the bad one and keep the rest.
async function classifyFiles(client, target, paths, topK, instruments = callMetrics(), parent = context.active()) {
  const attributes = { "histoserve.model": target.model, "histoserve.files": paths };
  return inSpan(parent, attributes, async (span, inside) => {
    const files = paths.map((file) => readFile(file, inside));
    const readable = files.filter((file) => !file.error);
    span.setAttribute("histoserve.batch_size", readable.length);
    const failure = (file, error) => { file.error = `${file.path}: ${error.details || error.message}`; };
    try {
      const rows = readable.length ? await classify(client, target, readable, topK, instruments, inside) : [];
      readable.forEach((file, i) => { file.predictions = rows[i]; });
    } catch (batchError) {
      if (readable.length === 1) failure(readable[0], batchError);
      for (const file of readable.length > 1 ? readable : []) {  // each a request of its own, in this trace
        const alone = { "histoserve.model": target.model, "histoserve.files": [file.path], "histoserve.batch_size": 1 };
        await inSpan(inside, alone, async (single, singleContext) => {
          try {
            file.predictions = (await classify(client, target, [file], topK, instruments, singleContext))[0];
          } catch (error) {
            failure(file, error);
            single.setStatus({ code: SpanStatusCode.ERROR, message: file.error });
          }
        });
      }
    }
    const failed = files.filter((file) => file.error).length;
    if (failed) span.setStatus({ code: SpanStatusCode.ERROR, message: `${failed} of ${files.length} files failed` });
    const traceId = sampled(span) ? span.spanContext().traceId : null;
    return files.map((file) => ({ path: file.path, predictions: file.predictions || null, error: file.error || null, trace_id: traceId }));
  });
}

async function main() {
  const options = parseArguments(process.argv.slice(2));
  let credentials;
  try {  // every option checked before any call
    credentials = channelCredentials(options);
  } catch (error) {
    usage(error.message);
  }
  const providers = [];
  try {
    for (const configure of [configureMetrics, configureTracing]) {
      const provider = configure();
      if (provider) providers.push(provider);
    }
  } catch (error) {
    process.stderr.write(`error: ${error.message}\n`);
    await Promise.all(providers.map((provider) => provider.shutdown()));
    return 2;
  }
  const client = inferenceClient(options.url, credentials);
  try {
    return await classifyAll(client, options, callMetrics());
  } finally {
    // exports what the periodic reader and the batch span processor have not sent yet
    await Promise.all(providers.map((provider) => provider.shutdown()));
    client.close();
  }
}

async function classifyAll(client, options, instruments) {
  const target = { url: options.url, model: options.model };
  let metadata;
  try {
    const ready = await call(client, "ModelReady", { name: options.model, version: "" }, 10);
    if (!ready.ready) throw new Error(`model ${options.model} is not ready`);
    metadata = await call(client, "ModelMetadata", { name: options.model, version: "" }, 10);
  } catch (error) {
    const tls = options.ssl || options.sslRootCertificates || options.sslPrivateKey || options.sslCertificateChain;
    const hint = error.code !== grpc.status.UNAVAILABLE ? ""
      : tls ? "; check that the server speaks TLS and that the certificates match (and, for mutual TLS, that it accepts this client's)"
        : "; if the server uses TLS, pass --ssl";
    process.stderr.write(`error: cannot use ${options.model} at ${options.url}: ${error.details || error.message}${hint}\n`);
    return 2;
  }
  if (metadata.inputs.length !== 1 || metadata.inputs[0].datatype !== "BYTES") {
    process.stderr.write(`error: ${options.model} does not take image files (BYTES); use its -encoded twin\n`);
    return 2;
  }
  let failed = 0;
  for (let start = 0; start < options.files.length; start += options.batchSize) {
    const batch = options.files.slice(start, start + options.batchSize);
    for (const result of await classifyFiles(client, target, batch, options.topK, instruments)) {  // in input order
      failed += result.error ? 1 : 0;
      process.stdout.write(JSON.stringify(result) + "\n");
    }
  }
  return failed ? 1 : 0;
}

module.exports = { callMetrics, channelCredentials, classifyFiles, configureMetrics, configureTracing, inferenceClient };

if (require.main === module) {
  main().then((code) => process.exit(code), (error) => {
    process.stderr.write(`error: ${error.stack || error}\n`);
    process.exit(2);
  });
}
