// Replay across nodes: M messages sent through node 0 are replayed, in order, to a
// client that connects to the last node with the offset just before them; then a
// live message from node 1 follows.
//
//   CHORUS_URLS=http://127.0.0.1:3001,http://127.0.0.1:3002,http://127.0.0.1:3003 \
//   CHORUS_TRANSPORT=websocket CHORUS_REPLAY_COUNT=200 node --test tests/js/replay.test.mjs
//
// CHORUS_REPLAY_COUNT   messages to send (default 200; the harness also runs 20000)
// CHORUS_REPLAY_SENDERS sockets on node 0 that share the sending (default min(8, M)):
//                       the tutorial's retry queue sends one packet at a time per
//                       socket, so several sockets keep the server's write batches full
// CHORUS_REPLAY_WINDOW  acks outstanding at most, over all senders (default 500)
// CHORUS_HISTORY        the server's history size, for the new-client check (default 100)

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  ChatClient,
  Clients,
  RUN_ID,
  Semaphore,
  TRANSPORTS,
  URLS,
  intFromEnv,
  isRejection,
  ms,
  report,
  sequenceProblems,
  summarize,
  droppedReport,
  waitUntil,
} from './support.mjs';

const M = intFromEnv('CHORUS_REPLAY_COUNT', 200);
const SENDERS = Math.min(intFromEnv('CHORUS_REPLAY_SENDERS', Math.min(8, M)), M);
const WINDOW = intFromEnv('CHORUS_REPLAY_WINDOW', 500);
const HISTORY = intFromEnv('CHORUS_HISTORY', 100);

const FIRST = URLS[0];
const SECOND = URLS[1 % URLS.length];
const LAST = URLS[URLS.length - 1];

// Timeouts grow with the count: a generous per-message budget on top of a base.
const BULK_TIMEOUT = ms(30_000 + 10 * M);
const TEST_TIMEOUT = ms(120_000 + 40 * M);

for (const transport of TRANSPORTS) {
  describe(`replay across nodes (${transport})`, () => {
    test(`${M} messages via node 0 are replayed by the last node from serverOffset K, then live from node 1`, { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      const prefix = `${RUN_ID}-replay-${transport}-`;
      try {
        // An observer on node 0 learns the offset of every message as it is broadcast.
        const observer = clients.add(new ChatClient('observer', FIRST, { transport }));
        const seen = new Map(); // content -> offset, for this run's messages
        let seenDup = 0;
        observer.onMessage = (content, offset) => {
          if (typeof content === 'string' && content.startsWith(prefix)) {
            if (seen.has(content)) seenDup++;
            else seen.set(content, offset);
          }
        };
        const senders = [];
        for (let s = 0; s < SENDERS; s++) {
          senders.push(clients.add(new ChatClient(`sender${s}`, FIRST, { transport })));
        }
        await Promise.all([observer, ...senders].map((c) => c.connected()));
        // One message first, so K >= 1 even on an empty database (serverOffset 0 means "new client").
        await senders[0].sendOk(`${RUN_ID}-replay-${transport}:prime`);

        // Send M messages, round-robin over the senders, at most WINDOW acks outstanding.
        const contents = Array.from({ length: M }, (_, i) => `${prefix}${i}`);
        const window = new Semaphore(WINDOW);
        const failures = [];
        let acked = 0;
        const started = Date.now();
        const pending = [];
        for (let i = 0; i < M; i++) {
          await window.acquire();
          const sender = senders[i % SENDERS];
          pending.push(
            sender.send(contents[i]).then((r) => {
              window.release();
              if (r.err || isRejection(r.res)) failures.push({ content: contents[i], err: r.err?.message, res: r.res });
              else acked++;
            }),
          );
        }
        await waitUntil(() => acked + failures.length === M, {
          timeoutMs: BULK_TIMEOUT,
          what: `acks of ${M} messages`,
          detail: () => `acked ${acked}, failed ${failures.length}${droppedReport(senders)}`,
        });
        await Promise.all(pending);
        const sendMs = Date.now() - started;
        assert.deepEqual(failures, [], 'every message must be acked without error');

        await waitUntil(() => seen.size === M, {
          timeoutMs: BULK_TIMEOUT,
          what: `the observer on node 0 to see all ${M} messages broadcast`,
          detail: () => `seen ${seen.size}${droppedReport([observer])}`,
        });
        assert.equal(seenDup, 0, 'the observer received some message twice');
        assert.deepEqual(sequenceProblems(observer.received), [], 'observer: offsets not consecutive');

        const offsets = contents.map((c) => seen.get(c));
        const K = Math.min(...offsets) - 1;
        const sortedOffsets = [...offsets].sort((a, b) => a - b);
        for (let i = 0; i < M; i++) {
          assert.equal(sortedOffsets[i], K + 1 + i, `the ${M} messages must take offsets ${K + 1}..${K + M} (no other writer)`);
        }
        // Each sender's queue sends in order and waits for the ack: its messages keep that order.
        for (let i = SENDERS; i < M; i++) {
          assert.ok(offsets[i] > offsets[i - SENDERS], `${contents[i]} stored before ${contents[i - SENDERS]} from the same sender`);
        }
        const expected = [...contents].sort((a, b) => seen.get(a) - seen.get(b)).map((c) => ({ content: c, offset: seen.get(c) }));

        // Replay from the last node.
        const replayStarted = Date.now();
        const replayer = clients.add(new ChatClient('replayer', LAST, { transport, serverOffset: K }));
        await replayer.connected();
        await waitUntil(() => replayer.received.length >= M, {
          timeoutMs: BULK_TIMEOUT,
          what: `the replayer on ${LAST} (serverOffset ${K}) to receive ${M} messages`,
          detail: () =>
            `received ${replayer.received.length}, last ${JSON.stringify(replayer.received.at(-1))}${droppedReport([replayer])}`,
        });
        const replayMs = Date.now() - replayStarted;
        const got = replayer.received.slice(0, M);
        if (!isDeepEqual(got, expected)) {
          const firstDiff = got.findIndex((m, i) => m.content !== expected[i].content || m.offset !== expected[i].offset);
          assert.fail(
            `replay differs from the broadcast order at #${firstDiff}: got ${summarize(got.slice(firstDiff, firstDiff + 3))}, ` +
              `expected ${summarize(expected.slice(firstDiff, firstDiff + 3))}; problems: ${summarize(sequenceProblems(got))}`,
          );
        }

        // Then a live message through node 1.
        const liveSender = clients.add(new ChatClient('live-sender', SECOND, { transport, serverOffset: K + M }));
        await liveSender.connected();
        const live = `${prefix}live`;
        await liveSender.sendOk(live);
        await replayer.waitFor(live, { timeoutMs: ms(15_000) });
        assert.deepEqual(
          replayer.received.slice(M),
          [{ content: live, offset: K + M + 1 }],
          'after the replay, exactly the live message must follow',
        );
        assert.deepEqual(replayer.malformed, []);

        // A new client (serverOffset 0) on the last node gets the newest HISTORY messages, then live ones.
        const newest = K + M + 1;
        const fresh = clients.add(new ChatClient('fresh', LAST, { transport }));
        await fresh.connected();
        const wantHistory = Math.min(HISTORY, newest);
        await waitUntil(() => fresh.received.length >= wantHistory && fresh.has(live), {
          timeoutMs: ms(15_000),
          what: `a new client on ${LAST} to receive the newest ${wantHistory} messages`,
          detail: () => `received ${fresh.received.length}, first ${JSON.stringify(fresh.received[0])}`,
        });
        const live2 = `${prefix}live-2`;
        await liveSender.sendOk(live2);
        await fresh.waitFor(live2);
        assert.equal(fresh.received.length, wantHistory + 1, `history then live: ${summarize(fresh.received.map((m) => m.offset))}`);
        assert.equal(fresh.received[0].offset, newest - wantHistory + 1, 'history starts at the right offset');
        assert.deepEqual(sequenceProblems(fresh.received), [], 'new client: offsets not consecutive');
        for (const m of fresh.received) {
          if (seen.has(m.content)) assert.equal(m.offset, seen.get(m.content), `history offset of ${m.content}`);
        }

        const retries = senders.reduce((n, s) => n + s.retriesSeen, 0);
        report(
          `replay ${transport} nodes=${URLS.length}: sent=${M} acked=${acked} senders=${SENDERS} window=${WINDOW} ` +
            `send_ms=${sendMs} (${Math.round((M * 1000) / Math.max(1, sendMs))}/s) retries=${retries} ` +
            `offsets=${K + 1}..${K + M} replayed=${M} replay_ms=${replayMs} gaps=0 duplicates=0 live_after_replay=1 ` +
            `history=${fresh.received.length - 1}`,
        );
      } finally {
        clients.closeAll();
      }
    });
  });
}

function isDeepEqual(a, b) {
  try {
    assert.deepEqual(a, b);
    return true;
  } catch {
    return false;
  }
}
