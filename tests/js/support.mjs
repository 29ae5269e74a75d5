// Shared helpers for the chorus scenario tests.
//
// Every client here is the official socket.io-client configured exactly like the
// tutorial's page (auth.serverOffset, ackTimeout 10000, retries 3), plus the
// options a test needs (transports, forceNew, reconnection). Receiving follows the
// tutorial's handler: remember the message, then `socket.auth.serverOffset = serverOffset`.

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
