// Shared helpers for the chorus scenario tests.
//
// Every client here is the official socket.io-client configured exactly like the
// tutorial's page (auth.serverOffset, ackTimeout 10000, retries 3), plus the
// options a test needs (transports, forceNew, reconnection). Receiving follows the
// tutorial's handler: remember the message, then `socket.auth.serverOffset = serverOffset`.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { io } from 'socket.io-client';

export { sleep };

// ---------------------------------------------------------------------------
// Environment

function intFromEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new Error(`${name} must be a positive integer, got ${JSON.stringify(raw)}`);
  }
  return n;
}

function numberFromEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) {
    throw new Error(`${name} must be a positive number, got ${JSON.stringify(raw)}`);
  }
  return n;
}

export { intFromEnv };

/** Base URLs of the running chorus nodes (CHORUS_URLS, comma separated). */
export const URLS = (process.env.CHORUS_URLS ?? '')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);
if (URLS.length === 0) {
  throw new Error(
    'CHORUS_URLS is not set: give the base URLs of the chorus nodes, e.g. ' +
      'CHORUS_URLS=http://127.0.0.1:3000 (comma separated for several nodes)',
  );
}
for (const u of URLS) {
  if (!/^https?:\/\/[^/]+\/?$/.test(u)) {
    throw new Error(`CHORUS_URLS entry ${JSON.stringify(u)} is not a base URL like http://127.0.0.1:3000`);
  }
}

/** Transports to test: CHORUS_TRANSPORT, or both when unset. */
export const TRANSPORTS = (() => {
  const raw = process.env.CHORUS_TRANSPORT;
  if (raw === undefined || raw === '') return ['websocket', 'polling'];
  if (raw !== 'websocket' && raw !== 'polling') {
    throw new Error(`CHORUS_TRANSPORT must be "websocket" or "polling", got ${JSON.stringify(raw)}`);
  }
  return [raw];
})();

/** Multiplies every timeout (CHORUS_TIMEOUT_SCALE, default 1), for slow machines. */
export const TIMEOUT_SCALE = numberFromEnv('CHORUS_TIMEOUT_SCALE', 1);

/** A timeout in ms, scaled. */
export function ms(base) {
  return Math.ceil(base * TIMEOUT_SCALE);
}

/** Default time allowed for one condition in a small scenario. */
export const STEP_TIMEOUT = ms(15_000);

/** The tutorial's ack options. */
export const ACK_TIMEOUT = 10_000;
export const RETRIES = 3;

/** A random id for this run; every content a test sends starts with it. */
export const RUN_ID = randomBytes(4).toString('hex');

export function pick(array) {
  return array[Math.floor(Math.random() * array.length)];
}

export function randomInt(min, max) {
  return min + Math.floor(Math.random() * (max - min + 1));
}

/** Prints one line into the test output (node --test shows it). */
export function report(line) {
  console.log(`[chorus ${RUN_ID}] ${line}`);
}

// ---------------------------------------------------------------------------
// Waiting: every wait is for a condition, with a deadline and a clear message.

const waiters = new Set();

/** Wake the waiters: call after anything a condition may depend on changed. */
export function changed() {
  for (const w of [...waiters]) w.check();
}

/**
 * Resolves once `cond()` is true (checked now and after every `changed()`),
 * rejects after `timeoutMs` with `what` (and `detail()`, if given) in the message.
 */
export function waitUntil(cond, { timeoutMs = STEP_TIMEOUT, what, detail } = {}) {
  if (!what) throw new Error('waitUntil needs a description (what)');
  return new Promise((resolve, reject) => {
    let timer;
    const w = {
      check() {
        let ok;
        try {
          ok = cond();
        } catch (err) {
          waiters.delete(w);
          clearTimeout(timer);
          reject(err);
          return;
        }
        if (ok) {
          waiters.delete(w);
          clearTimeout(timer);
          resolve();
        }
      },
    };
    timer = setTimeout(() => {
      waiters.delete(w);
      let extra = '';
      if (detail) {
        try {
          extra = `: ${detail()}`;
        } catch (err) {
          extra = ` (detail failed: ${err.message})`;
        }
      }
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}${extra}`));
    }, timeoutMs);
    waiters.add(w);
    w.check();
  });
}

/** Races a promise against a deadline. */
export function withTimeout(promise, timeoutMs, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/** A counting semaphore, to bound the number of acks outstanding. */
export class Semaphore {
  constructor(permits) {
    this.permits = permits;
    this.queue = [];
  }
  acquire() {
    if (this.permits > 0) {
      this.permits--;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.queue.push(resolve));
  }
  release() {
    const next = this.queue.shift();
    if (next) next();
    else this.permits++;
  }
}

// ---------------------------------------------------------------------------
// Clients

/** io() options: the tutorial's, plus what a test needs. */
export function tutorialOptions({ serverOffset = 0, transport, reconnection = false }) {
  return {
    auth: { serverOffset },
    ackTimeout: ACK_TIMEOUT,
    retries: RETRIES,
    transports: [transport],
    forceNew: true,
    reconnection,
  };
}

/** Is this ack response a permanent rejection ({ error: { code, message } })? */
export function isRejection(res) {
  return res !== null && typeof res === 'object' && res.error !== undefined;
}

function describeValue(v) {
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

/**
 * One tutorial client: an io() socket whose 'chat message' handler records what
 * arrives and sets socket.auth.serverOffset, and whose sends go through the
 * client's retry queue with `${socket.id}-${counter++}` client offsets.
 */
export class ChatClient {
  /**
   * @param {string} name for messages
   * @param {string} url base URL of a node
   * @param {object} opts { transport, serverOffset = 0, reconnection = false, ioOptions }
   */
  constructor(name, url, { transport, serverOffset = 0, reconnection = false, ioOptions } = {}) {
    if (!transport) throw new Error('ChatClient needs a transport');
    this.name = name;
    this.url = url;
    this.transport = transport;
    /** every 'chat message' received: { content, offset } */
    this.received = [];
    /** content -> how many times it was received */
    this.contentCount = new Map();
    /** problems with what the server sent (wrong argument types) */
    this.malformed = [];
    this.counter = 0;
    this.sent = 0;
    this.outgoing = 0;
    this.socket = io(url, ioOptions ?? tutorialOptions({ serverOffset, transport, reconnection }));
    const socket = this.socket;
    socket.on('chat message', (msg, serverOffset) => {
      if (typeof msg !== 'string' || typeof serverOffset !== 'number' || !Number.isSafeInteger(serverOffset)) {
        this.malformed.push({ msg, serverOffset });
      }
      this.received.push({ content: msg, offset: serverOffset });
      this.contentCount.set(msg, (this.contentCount.get(msg) ?? 0) + 1);
      this.onMessage?.(msg, serverOffset);
      socket.auth.serverOffset = serverOffset;
      changed();
    });
    socket.onAnyOutgoing((event) => {
      if (event === 'chat message') this.outgoing++;
    });
    /** disconnects this client did not ask for: reasons */
    this.dropped = [];
    socket.on('connect', changed);
    socket.on('disconnect', (reason, description) => {
      if (reason !== 'io client disconnect') {
        this.dropped.push(description?.message ? `${reason} (${description.message})` : reason);
      }
      changed();
    });
  }

  /** Offset of the newest message seen (the tutorial keeps it in socket.auth). */
  get lastOffset() {
    return this.socket.auth?.serverOffset;
  }

  /** How many times a 'chat message' was written beyond the first try of each send. */
  get retriesSeen() {
    return Math.max(0, this.outgoing - this.sent);
  }

  /** Resolves on 'connect'; rejects on connect_error (if `failOnError`) or timeout. */
  connected({ timeoutMs = STEP_TIMEOUT, failOnError = true } = {}) {
    const socket = this.socket;
    if (socket.connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        socket.off('connect', onConnect);
        socket.off('connect_error', onError);
      };
      const onConnect = () => {
        cleanup();
        resolve();
      };
      const onError = (err) => {
        if (!failOnError) return;
        cleanup();
        reject(new Error(`${this.name}: connect_error from ${this.url} (${this.transport}): ${err.message}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`${this.name}: timed out after ${timeoutMs} ms waiting for connect to ${this.url} (${this.transport})`));
      }, timeoutMs);
      socket.on('connect', onConnect);
      socket.on('connect_error', onError);
    });
  }

  /** Resolves with the connect_error (the test expects the server to refuse). */
  connectError({ timeoutMs = STEP_TIMEOUT } = {}) {
    const socket = this.socket;
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        socket.off('connect', onConnect);
        socket.off('connect_error', onError);
      };
      const onConnect = () => {
        cleanup();
        reject(new Error(`${this.name}: expected connect_error from ${this.url}, but the connection was accepted`));
      };
      const onError = (err) => {
        cleanup();
        resolve(err);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`${this.name}: timed out after ${timeoutMs} ms waiting for connect_error from ${this.url}`));
      }, timeoutMs);
      socket.on('connect', onConnect);
      socket.on('connect_error', onError);
    });
  }

  nextClientOffset() {
    return `${this.socket.id}-${this.counter++}`;
  }

  /**
   * The tutorial's send: socket.emit('chat message', content, clientOffset) through
   * the retry queue, with an ack callback to learn the outcome. Resolves (never
   * rejects) with { err, res, ms, clientOffset }: `err` set only when every retry
   * failed, `res` the server's first ack argument.
   */
  send(content, clientOffset = this.nextClientOffset()) {
    const started = Date.now();
    this.sent++;
    return new Promise((resolve) => {
      this.socket.emit('chat message', content, clientOffset, (err, res) => {
        resolve({ err, res, ms: Date.now() - started, clientOffset });
        // Conditions on acks re-check once the promise's reactions have run.
        setImmediate(changed);
      });
    });
  }

  /** send(), then require a success ack within `timeoutMs`. */
  async sendOk(content, clientOffset, { timeoutMs = STEP_TIMEOUT } = {}) {
    const what = `${this.name}: ack of ${describeValue(content)}`;
    const r = await withTimeout(this.send(content, clientOffset), timeoutMs, what);
    if (r.err) throw new Error(`${what}: no ack after all retries: ${r.err.message}`);
    if (isRejection(r.res)) throw new Error(`${what}: rejected by the server: ${describeValue(r.res)}`);
    return r;
  }

  /** Messages received whose content starts with `prefix`. */
  receivedWith(prefix) {
    return this.received.filter((m) => typeof m.content === 'string' && m.content.startsWith(prefix));
  }

  /** Has this client received a message with this exact content? */
  has(content) {
    return this.contentCount.has(content);
  }

  /** How many times a message with this content has arrived. */
  countOf(content) {
    return this.contentCount.get(content) ?? 0;
  }

  /** Waits until a message with this content has arrived. */
  waitFor(content, { timeoutMs = STEP_TIMEOUT } = {}) {
    return waitUntil(() => this.has(content), {
      timeoutMs,
      what: `${this.name} to receive ${describeValue(content)}`,
      detail: () =>
        `last 5 received: ${describeValue(this.received.slice(-5))}, connected=${this.socket.connected}` +
        (this.dropped.length ? `, dropped by the server/transport: ${describeValue(this.dropped)}` : ''),
    });
  }

  close() {
    this.socket.disconnect();
  }
}

/** "name: reasons" for every client that lost its connection without asking. */
export function droppedReport(clients) {
  const lines = clients.filter((c) => c.dropped.length).map((c) => `${c.name}: ${c.dropped.join(', ')}`);
  return lines.length ? `; connections dropped: ${lines.join('; ')}` : '';
}

/** Tracks clients so a test can close all of them in `finally`. */
export class Clients {
  constructor() {
    this.all = [];
  }
  add(client) {
    this.all.push(client);
    return client;
  }
  closeAll() {
    for (const c of this.all) {
      try {
        c.close();
      } catch {
        // already closed
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Checks on what a client received

/**
 * Problems in a received sequence: offsets must be numbers, strictly increasing
 * and consecutive (the store's offsets are gapless), each offset once.
 * Returns a list of human readable problems (empty when fine).
 */
export function sequenceProblems(received, { limit = 10 } = {}) {
  const problems = [];
  for (let i = 1; i < received.length && problems.length < limit; i++) {
    const prev = received[i - 1].offset;
    const cur = received[i].offset;
    if (cur !== prev + 1) {
      problems.push(
        `#${i}: offset ${cur} (${describeValue(received[i].content)}) after ${prev} ` +
          (cur <= prev ? '(out of order or duplicate)' : `(gap of ${cur - prev - 1})`),
      );
    }
  }
  return problems;
}

export function summarize(list, n = 8) {
  return describeValue(list.length > n ? [...list.slice(0, n), `... ${list.length - n} more`] : list);
}

/** One receiver's log against the reference: counts of what went wrong. */
export function analyze(log, { baselineContent, sentContents, reference, expected = sentContents }) {
  const start = log.findIndex((m) => m.content === baselineContent);
  const window = start < 0 ? [] : log.slice(start);
  const seenOffsets = new Set();
  const seenContents = new Map(); // run content -> times
  let duplicated = 0;
  let outOfOrder = 0;
  let gaps = 0;
  let divergent = 0;
  let maxOffset = -Infinity;
  const examples = [];
  for (const m of window) {
    const newOffset = !seenOffsets.has(m.offset);
    if (!newOffset) {
      duplicated++;
      if (examples.length < 5) examples.push(`duplicate offset ${m.offset}`);
    } else {
      seenOffsets.add(m.offset);
      if (m.offset < maxOffset) {
        outOfOrder++;
        if (examples.length < 5) examples.push(`offset ${m.offset} after ${maxOffset}`);
      } else if (maxOffset !== -Infinity && m.offset > maxOffset + 1) {
        gaps++;
        if (examples.length < 5) examples.push(`jump ${maxOffset} -> ${m.offset}`);
      }
    }
    maxOffset = Math.max(maxOffset, m.offset);
    if (sentContents.has(m.content)) {
      const n = (seenContents.get(m.content) ?? 0) + 1;
      seenContents.set(m.content, n);
      if (n > 1 && newOffset) {
        duplicated++; // the same content again, under another offset
        if (examples.length < 5) examples.push(`${JSON.stringify(m.content)} again at offset ${m.offset}`);
      }
    }
    const ref = reference.get(m.offset);
    if (ref !== undefined && ref !== m.content) {
      divergent++;
      if (examples.length < 5) examples.push(`offset ${m.offset}: ${JSON.stringify(m.content)} vs ${JSON.stringify(ref)}`);
    }
  }
  let lost = 0;
  for (const c of expected) if (!seenContents.has(c)) lost++;
  return { baseline: start >= 0, seen: window.length, lost, duplicated, outOfOrder, gaps, divergent, examples };
}

/** "lost=.. duplicated=.. out_of_order=.. gaps=.. divergent=.." for one analyzed log. */
export function countsLine(a) {
  return (
    `lost=${a.lost} duplicated=${a.duplicated} out_of_order=${a.outOfOrder} gaps=${a.gaps} divergent=${a.divergent}` +
    (a.examples.length ? ` e.g. ${a.examples.join('; ')}` : '')
  );
}

/**
 * Checks a whole run: `logs` is [{ name, log }] of every client that watched from the baseline
 * message to the final one. The reference order is offset -> content as first seen by anyone.
 * Returns the reference, each content's offset, what was stored twice or never seen, offsets
 * between baseline and final that nobody saw, and each log's analysis (same order as `logs`).
 */
export function checkRun(logs, { baselineContent, finalContent, sentContents, mustStore = sentContents }) {
  const reference = new Map();
  let conflicts = 0;
  for (const { log } of logs) {
    for (const m of log) {
      const had = reference.get(m.offset);
      if (had === undefined) reference.set(m.offset, m.content);
      else if (had !== m.content) conflicts++;
    }
  }
  // The run's offsets: gapless, each content stored once.
  const runOffsets = new Map(); // content -> offset
  const storedTwice = [];
  for (const [offset, content] of reference) {
    if (sentContents.has(content) || content === baselineContent) {
      if (runOffsets.has(content)) storedTwice.push(`${content} at ${runOffsets.get(content)} and ${offset}`);
      else runOffsets.set(content, offset);
    }
  }
  const first = runOffsets.get(baselineContent);
  const last = runOffsets.get(finalContent);
  // Every message that must be stored (by default every one sent; an acked one always).
  const neverStored = [...mustStore].filter((c) => !runOffsets.has(c));
  const undelivered = [];
  for (let o = first; o <= last; o++) if (!reference.has(o)) undelivered.push(o);
  // What every client must have seen: what had to be stored, and whatever anyone saw stored.
  const expected = new Set([...mustStore].concat([...runOffsets.keys()].filter((c) => sentContents.has(c))));
  const results = logs.map(({ name, log }) => ({ name, ...analyze(log, { baselineContent, sentContents, reference, expected }) }));
  const sum = (k) => results.reduce((n, x) => n + x[k], 0);
  const totals = {
    lost: sum('lost'),
    duplicated: sum('duplicated'),
    outOfOrder: sum('outOfOrder'),
    gaps: sum('gaps'),
    divergent: sum('divergent'),
  };
  return { reference, conflicts, runOffsets, storedTwice, neverStored, undelivered, first, last, results, totals };
}

/** Asserts what checkRun found: nothing stored twice, lost, out of order, or seen differently. */
export function assertRun(run) {
  const { storedTwice, neverStored, undelivered, first, last, conflicts, results } = run;
  assert.deepEqual(storedTwice, [], 'a message was stored (broadcast) under two offsets');
  assert.deepEqual(neverStored, [], 'acked messages that no client ever received');
  assert.deepEqual(undelivered, [], `offsets between baseline ${first} and final ${last} that no client received`);
  assert.equal(conflicts, 0, 'two clients saw different contents under the same offset');
  for (const x of results) {
    assert.ok(x.baseline, `${x.name} never got the baseline message`);
    const bad = { lost: x.lost, duplicated: x.duplicated, out_of_order: x.outOfOrder, gaps: x.gaps, divergent: x.divergent };
    assert.deepEqual(
      bad,
      { lost: 0, duplicated: 0, out_of_order: 0, gaps: 0, divergent: 0 },
      `${x.name}: ${Object.entries(bad).map(([k, v]) => `${k}=${v}`).join(' ')}; e.g. ${summarize(x.examples)}`,
    );
  }
}
