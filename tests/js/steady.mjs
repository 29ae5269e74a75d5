// A steady chat load through one address (a load balancer), for fault tests driven from outside.
//
//   CHORUS_URLS=http://127.0.0.1:8080 CHORUS_SOURCES=127.0.0.2,127.0.0.3 node tests/js/steady.mjs
//
// Clients are the tutorial's: default transports (polling, then the upgrade to websocket),
// automatic reconnection, auth.serverOffset kept by the 'chat message' handler, acks with
// retries. Client i connects from CHORUS_SOURCES[i % n], so a load balancer that routes by source
// address spreads them over its nodes.
//
// Protocol with the harness: once every client is connected, upgraded and has the baseline
// message, this prints `READY {...}` and senders start sending every CHORUS_SEND_INTERVAL_MS. The
// harness then stops, kills and restarts nodes. `mark NAME` on stdin starts a measurement phase:
// each message carries its send time, and delivery latencies are reported per phase. When the
// harness writes `stop` (or closes stdin), senders stop, every send must be acked, a final
// message must reach every client, and every client's log from the baseline to the final
// message must be complete, in order and without repeats. The last line is `RESULT {...}`; the
// exit code is 0 only when every check passed.
//
// With CHORUS_SENDS_MAY_FAIL=1 (the nemesis: a node frozen past the client's ack retries) a send
// that the client gave up on is counted, not a failure; it must still be stored at most once,
// and every acked one must reach every client. Ack latencies are reported by phase too.
//
// CHORUS_SENDERS (4), CHORUS_RECEIVERS (8), CHORUS_SEND_INTERVAL_MS (20), CHORUS_RUN_LIMIT_MS (300000)

import assert from 'node:assert/strict';
import http from 'node:http';
import readline from 'node:readline';

import {
  ACK_TIMEOUT,
  RETRIES,
  RUN_ID,
  URLS,
  ChatClient,
  Clients,
  assertRun,
  changed,
  checkRun,
  countsLine,
  intFromEnv,
  isRejection,
  ms,
  summarize,
  waitUntil,
} from './support.mjs';

const SENDERS = intFromEnv('CHORUS_SENDERS', 4);
const RECEIVERS = intFromEnv('CHORUS_RECEIVERS', 8);
const INTERVAL = intFromEnv('CHORUS_SEND_INTERVAL_MS', 20);
const RUN_LIMIT = intFromEnv('CHORUS_RUN_LIMIT_MS', 300_000);
const SOURCES = (process.env.CHORUS_SOURCES ?? '127.0.0.1')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);
const SETTLE_TIMEOUT = ms(60_000);
const SENDS_MAY_FAIL = process.env.CHORUS_SENDS_MAY_FAIL === '1';

/** A tutorial client whose connections leave from `source`; counts reconnects and upgrades. */
function tutorialClient(name, source, clients) {
  const agent = new http.Agent({ keepAlive: true, localAddress: source });
  const client = new ChatClient(name, URLS[0], {
    transport: 'default',
    ioOptions: { auth: { serverOffset: 0 }, ackTimeout: ACK_TIMEOUT, retries: RETRIES, forceNew: true, agent },
  });
  client.source = source;
  client.onMessage = recordLatency;
  client.reconnects = 0;
  client.upgrades = 0;
  const manager = client.socket.io;
  manager.on('reconnect', () => {
    client.reconnects++;
    changed();
  });
  manager.on('open', () => {
    manager.engine.on('upgrade', () => {
      client.upgrades++;
      changed();
    });
  });
  return clients.add(client);
}

const transportOf = (c) => c.socket.io.engine?.transport?.name;

/** Delivery and ack latencies (ms) by phase; the harness names phases with `mark NAME`. */
const phases = new Map([['start', []]]);
let phase = phases.get('start');
const ackPhases = new Map([['start', []]]);
let ackPhase = ackPhases.get('start');

/** Resolves when the harness says stop (a `stop` line or the end of stdin); follows marks. */
function listenToHarness() {
  return new Promise((resolve) => {
    const lines = readline.createInterface({ input: process.stdin });
    lines.on('line', (line) => {
      const [word, name] = line.trim().split(/\s+/, 2);
      if (word === 'stop') resolve('stop');
      if (word === 'mark' && name) {
        if (!phases.has(name)) phases.set(name, []);
        if (!ackPhases.has(name)) ackPhases.set(name, []);
        phase = phases.get(name);
        ackPhase = ackPhases.get(name);
      }
    });
    lines.on('close', () => resolve('stdin closed'));
  });
}

/** Records the delivery latency of a message whose content ends with `@{send time in ms}`. */
function recordLatency(content) {
  const at = typeof content === 'string' ? content.lastIndexOf('@') : -1;
  if (at < 0) return;
  const sent = Number(content.slice(at + 1));
  if (Number.isFinite(sent)) phase.push(Date.now() - sent);
}

function percentiles(samples) {
  if (samples.length === 0) return { n: 0 };
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { n: sorted.length, p50: at(0.5), p95: at(0.95), p99: at(0.99), max: sorted[sorted.length - 1] };
}

async function main() {
  const clients = new Clients();
  const prefix = `${RUN_ID}-steady-`;
  const stop = listenToHarness();
  try {
    const senders = [];
    const receivers = [];
    for (let i = 0; i < SENDERS + RECEIVERS; i++) {
      const source = SOURCES[i % SOURCES.length];
      const c = i < SENDERS ? tutorialClient(`s${i}`, source, clients) : tutorialClient(`r${i - SENDERS}`, source, clients);
      (i < SENDERS ? senders : receivers).push(c);
    }
    const all = [...senders, ...receivers];
    await Promise.all(all.map((c) => c.connected()));
    await waitUntil(() => all.every((c) => transportOf(c) === 'websocket'), {
      what: 'every client to upgrade from polling to websocket',
      detail: () => all.map((c) => `${c.name}:${transportOf(c)}`).join(' '),
    });
    const baselineContent = `${prefix}baseline`;
    await senders[0].sendOk(baselineContent);
    await waitUntil(() => all.every((c) => c.has(baselineContent)), {
      what: 'every client to get the baseline message',
      detail: () => all.filter((c) => !c.has(baselineContent)).map((c) => c.name).join(','),
    });
    console.log(`READY ${JSON.stringify({ clients: all.length, sources: SOURCES.length })}`);

    // Each sender queues one message per interval; the tutorial's retry queue sends them in turn.
    const sentContents = new Set();
    const ackedContents = new Set();
    const failures = [];
    let acked = 0;
    let queued = 0;
    const pending = [];
    const timers = senders.map((s, i) => {
      let k = 0;
      return setInterval(() => {
        const sentAt = Date.now();
        const content = `${prefix}s${i}-${k++}@${sentAt}`;
        sentContents.add(content);
        queued++;
        pending.push(
          s.send(content).then((r) => {
            if (r.err || isRejection(r.res)) failures.push({ content, err: r.err?.message, res: r.res });
            else {
              acked++;
              ackedContents.add(content);
              ackPhase.push(Date.now() - sentAt);
            }
            changed();
          }),
        );
      }, INTERVAL);
    });
    const limit = new Promise((resolve) => setTimeout(() => resolve('run limit'), RUN_LIMIT).unref());
    const why = await Promise.race([stop, limit]);
    for (const t of timers) clearInterval(t);
    assert.notEqual(why, 'run limit', `the harness did not say stop within ${RUN_LIMIT} ms`);

    await waitUntil(() => acked + failures.length === queued, {
      timeoutMs: SETTLE_TIMEOUT,
      what: `acks of ${queued} messages`,
      detail: () => `acked ${acked}, failed ${failures.length}, connected ${all.filter((c) => c.socket.connected).length}/${all.length}`,
    });
    await Promise.all(pending);
    const finalContent = `${prefix}final`;
    await senders[0].sendOk(finalContent, undefined, { timeoutMs: SETTLE_TIMEOUT });
    sentContents.add(finalContent);
    ackedContents.add(finalContent);
    await waitUntil(() => all.every((c) => c.has(finalContent)), {
      timeoutMs: SETTLE_TIMEOUT,
      what: 'every client to get the final message',
      detail: () => all.filter((c) => !c.has(finalContent)).map((c) => `${c.name} connected=${c.socket.connected}`).join(', '),
    });

    const logs = all.map((c) => ({ name: c.name, log: c.received }));
    const run = checkRun(logs, { baselineContent, finalContent, sentContents, mustStore: ackedContents });
    for (const [i, c] of all.entries()) {
      const a = run.results[i];
      console.log(`client ${c.name} from ${c.source}: seen=${a.seen} reconnects=${c.reconnects} upgrades=${c.upgrades} ${countsLine(a)}`);
    }
    const result = {
      sent: queued + 1,
      acked: acked + 1,
      failed: failures.length,
      stored: run.runOffsets.size - 1, // the baseline was sent before counting
      clients: all.length,
      reconnects: all.reduce((n, c) => n + c.reconnects, 0),
      retries: senders.reduce((n, s) => n + s.retriesSeen, 0),
      ...run.totals,
      conflicts: run.conflicts,
      stored_twice: run.storedTwice.length,
      never_seen: run.neverStored.length,
      offsets: [run.first, run.last],
      latency_ms: Object.fromEntries([...phases].map(([name, samples]) => [name, percentiles(samples)])),
      ack_latency_ms: Object.fromEntries([...ackPhases].map(([name, samples]) => [name, percentiles(samples)])),
    };
    console.log(`RESULT ${JSON.stringify(result)}`);
    if (!SENDS_MAY_FAIL) assert.deepEqual(failures.slice(0, 5), [], `every send must be acked (${failures.length} failed)`);
    assertRun(run);
    assert.ok(all.every((c) => c.upgrades >= 1), 'every client upgraded to websocket');
  } finally {
    clients.closeAll();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.log(`FAILED ${err.stack ?? err}`);
    if (err.actual !== undefined) console.log(`actual: ${summarize([].concat(err.actual))}`);
    process.exit(1);
  },
);
