// Concurrent senders and churning receivers over every node.
//
//   CHORUS_URLS=http://127.0.0.1:3001,http://127.0.0.1:3002,http://127.0.0.1:3003 \
//   CHORUS_TRANSPORT=websocket CHORUS_SENDS=200 node --test tests/js/concurrency.test.mjs
//
// 8 senders (round-robin over the nodes) each queue CHORUS_SENDS messages at once
// and the tutorial's retry queue delivers them. 8 receivers start on random nodes
// and, every 50-300 ms, drop their connection and open a new one on a random node
// with auth.serverOffset = the last offset they saw (the tutorial's logic). At the
// end every receiver must have seen every message once, in one gapless order, the
// same order as everybody else.
//
// CHORUS_SENDS          messages per sender (default 200)
// CHORUS_SENDERS        senders (default 8)
// CHORUS_RECEIVERS      churning receivers (default 8)
// CHORUS_CHURN_MIN_MS / CHORUS_CHURN_MAX_MS  time between reconnects (default 50 / 300)

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  ChatClient,
  Clients,
  RUN_ID,
  TRANSPORTS,
  URLS,
  changed,
  intFromEnv,
  isRejection,
  ms,
  pick,
  randomInt,
  report,
  sleep,
  summarize,
  droppedReport,
  waitUntil,
  checkRun,
  assertRun,
  countsLine,
} from './support.mjs';

const SENDS = intFromEnv('CHORUS_SENDS', 200);
const SENDERS = intFromEnv('CHORUS_SENDERS', 8);
const RECEIVERS = intFromEnv('CHORUS_RECEIVERS', 8);
const CHURN_MIN = intFromEnv('CHORUS_CHURN_MIN_MS', 50);
const CHURN_MAX = Math.max(CHURN_MIN, intFromEnv('CHORUS_CHURN_MAX_MS', 300));
const TOTAL = SENDS * SENDERS;

const BULK_TIMEOUT = ms(60_000 + 20 * TOTAL);
const TEST_TIMEOUT = ms(180_000 + 60 * TOTAL);

/**
 * A receiver that keeps moving: one tutorial client at a time; to move, it
 * disconnects and opens a new io() on a random node with auth.serverOffset = the
 * last offset the old socket saw. `log` holds every message any of its sockets got.
 */
class ChurningReceiver {
  constructor(name, transport, clients) {
    this.name = name;
    this.transport = transport;
    this.clients = clients;
    this.log = [];
    this.contents = new Set();
    this.error = null;
    this.reconnects = 0;
    this.connectErrors = [];
    this.nodes = new Map();
    this.client = null;
    this.stopped = false;
    this.loop = null;
  }

  get lastOffset() {
    return this.client ? this.client.lastOffset : 0;
  }

  async open(serverOffset) {
    // The tutorial's client does not retry after a connect_error from the server, so any is
    // a failure (asserted at the end); retrying here only keeps the run going to count the rest.
    for (let attempt = 1; ; attempt++) {
      const idx = Math.floor(Math.random() * URLS.length);
      const client = this.clients.add(
        new ChatClient(`${this.name}#${this.reconnects}`, URLS[idx], { transport: this.transport, serverOffset }),
      );
      client.onMessage = (content, offset) => {
        this.log.push({ content, offset });
        this.contents.add(content);
      };
      try {
        await client.connected();
        this.client = client;
        this.nodes.set(idx, (this.nodes.get(idx) ?? 0) + 1);
        changed();
        return;
      } catch (err) {
        client.close();
        this.connectErrors.push(err.message);
        if (attempt >= 5) throw new Error(`${this.name}: could not reconnect after ${attempt} attempts: ${err.message}`);
      }
    }
  }

  start() {
    this.loop = (async () => {
      try {
        await this.churn();
      } catch (err) {
        this.error = err;
      }
    })();
  }

  async churn() {
    while (!this.stopped) {
      // A random pause between moves: this is the churn itself, not a wait for a condition.
      await sleep(randomInt(CHURN_MIN, CHURN_MAX));
      if (this.stopped) break;
      const old = this.client;
      old.socket.disconnect();
      // The tutorial's handler left the newest offset in socket.auth.serverOffset.
      const last = old.socket.auth.serverOffset;
      this.reconnects++;
      await this.open(last);
    }
  }

  /** Stops moving; throws if a move failed. Leaves the receiver connected. */
  async stop() {
    this.stopped = true;
    await this.loop;
    if (this.error) throw this.error;
    // Dropped by the server meanwhile? Come back the tutorial's way (the drop is reported).
    if (!this.client.socket.connected) {
      const last = this.client.socket.auth.serverOffset;
      this.client.close();
      this.reconnects++;
      await this.open(last);
    }
  }

  /** Connections of this receiver that ended without the receiver asking. */
  get dropped() {
    return this.clients.all.filter((c) => c.name.startsWith(`${this.name}#`)).flatMap((c) => c.dropped);
  }
}

for (const transport of TRANSPORTS) {
  describe(`concurrency over ${URLS.length} node(s) (${transport})`, () => {
    test(`${SENDERS} senders x ${SENDS} messages, ${RECEIVERS} receivers reconnecting every ${CHURN_MIN}-${CHURN_MAX} ms`, { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      const receivers = [];
      const prefix = `${RUN_ID}-conc-${transport}-`;
      try {
        // Baseline: one message before anybody counts, so every receiver starts with a
        // known offset and the counting window starts at the same message for all.
        const senders = [];
        for (let s = 0; s < SENDERS; s++) {
          senders.push(clients.add(new ChatClient(`s${s}`, URLS[s % URLS.length], { transport })));
        }
        await Promise.all(senders.map((c) => c.connected()));
        const baselineContent = `${prefix}baseline`;
        await senders[0].sendOk(baselineContent);

        for (let r = 0; r < RECEIVERS; r++) receivers.push(new ChurningReceiver(`r${r}`, transport, clients));
        await Promise.all(receivers.map((r) => r.open(0)));
        await waitUntil(() => receivers.every((r) => r.contents.has(baselineContent)), {
          what: 'every receiver to get the baseline message in its history',
          detail: () => receivers.filter((r) => !r.contents.has(baselineContent)).map((r) => r.name).join(','),
        });
        for (const r of receivers) r.start();

        // Every sender queues all of its messages at once; the retry queue sends them.
        const sentContents = new Set();
        const failures = [];
        let acked = 0;
        const started = Date.now();
        const sends = [];
        for (let s = 0; s < SENDERS; s++) {
          for (let k = 0; k < SENDS; k++) {
            const content = `${prefix}s${s}-${k}`;
            sentContents.add(content);
            sends.push(
              senders[s].send(content).then((r) => {
                if (r.err || isRejection(r.res)) failures.push({ content, err: r.err?.message, res: r.res });
                else acked++;
                changed();
              }),
            );
          }
        }
        await waitUntil(() => acked + failures.length === TOTAL, {
          timeoutMs: BULK_TIMEOUT,
          what: `acks of ${TOTAL} messages from ${SENDERS} senders`,
          detail: () => `acked ${acked}, failed ${failures.length}${droppedReport(senders)}`,
        });
        await Promise.all(sends);
        const sendMs = Date.now() - started;
        assert.deepEqual(failures, [], 'every message must be acked without error');

        // Stop moving, then a final message: when every receiver has it, nothing else is in flight.
        await Promise.all(receivers.map((r) => r.stop()));
        const finalContent = `${prefix}final`;
        await senders[0].sendOk(finalContent);
        sentContents.add(finalContent);
        const runCount = (r) => {
          let n = 0;
          for (const m of r.log) if (sentContents.has(m.content)) n++;
          return n;
        };
        // Senders are analyzed too, so wait for them as well: a sender on another node than
        // the final message's may get it a moment after the receivers do.
        const senderHas = (s, c) => s.received.some((m) => m.content === c);
        await waitUntil(() => receivers.every((r) => r.contents.has(finalContent)) && senders.every((s) => senderHas(s, finalContent)), {
          timeoutMs: BULK_TIMEOUT,
          what: 'every receiver and sender to get the final message',
          detail: () => receivers.map((r) => `${r.name}: ${runCount(r)}/${sentContents.size} connected=${r.client?.socket.connected}`).join(', '),
        });

        const allLogs = [
          ...receivers.map((r) => ({ name: r.name, log: r.log, r })),
          ...senders.map((s) => ({ name: s.name, log: s.received, r: null })),
        ];
        const run = checkRun(allLogs, { baselineContent, finalContent, sentContents });
        const { conflicts, runOffsets, storedTwice, neverStored, undelivered, first, last, results } = run;
        // Each sender's queue waits for an ack before the next send: its order must hold.
        let senderOrder = 0;
        for (let s = 0; s < SENDERS; s++) {
          for (let k = 1; k < SENDS; k++) {
            if (runOffsets.get(`${prefix}s${s}-${k}`) < runOffsets.get(`${prefix}s${s}-${k - 1}`)) senderOrder++;
          }
        }

        for (const [i, { name, r }] of allLogs.entries()) {
          const a = results[i];
          const moves = r
            ? ` reconnects=${r.reconnects} nodes=${JSON.stringify(Object.fromEntries([...r.nodes].sort()))} dropped=${r.dropped.length}`
            : '';
          report(`concurrency ${transport} ${name}: seen=${a.seen}${moves} ${countsLine(a)}`);
        }
        const sum = (k) => results.reduce((n, x) => n + x[k], 0);
        const totalReconnects = receivers.reduce((n, r) => n + r.reconnects, 0);
        const connectErrors = receivers.flatMap((r) => r.connectErrors);
        const dropped = [...receivers.flatMap((r) => r.dropped), ...senders.flatMap((s) => s.dropped)];
        const retries = senders.reduce((n, s) => n + s.retriesSeen, 0);
        report(
          `concurrency ${transport} nodes=${URLS.length}: sent=${TOTAL} acked=${acked} send_ms=${sendMs} retries=${retries} ` +
            `offsets=${first}..${last} receivers=${RECEIVERS} reconnects=${totalReconnects} connect_errors=${connectErrors.length} ` +
            `dropped=${dropped.length} ` +
            `lost=${sum('lost')} duplicated=${sum('duplicated')} out_of_order=${sum('outOfOrder')} gaps=${sum('gaps')} ` +
            `divergent=${sum('divergent')} conflicts=${conflicts} sender_order=${senderOrder} ` +
            `stored_twice=${storedTwice.length} never_seen=${neverStored.length} offsets_seen_by_nobody=${undelivered.length}`,
        );
        if (connectErrors.length) report(`connect errors: ${summarize(connectErrors, 3)}`);
        if (dropped.length) report(`connections dropped by the server or transport: ${summarize(dropped, 5)}`);

        assertRun(run);
        assert.deepEqual(connectErrors, [], 'a reconnect with auth.serverOffset = last seen offset was refused');
        assert.equal(senderOrder, 0, "a sender's messages were stored out of its send order");
      } finally {
        // Let any move in progress finish (it may be opening a socket), then close everything.
        for (const r of receivers) r.stopped = true;
        await Promise.allSettled(receivers.map((r) => r.loop));
        clients.closeAll();
      }
    });
  });
}
