// The tutorial's client against one chorus node.
//
//   CHORUS_URLS=http://127.0.0.1:3000 CHORUS_TRANSPORT=websocket node --test tests/js/tutorial.test.mjs
//
// Only the first URL is used. Without CHORUS_TRANSPORT both transports are tested.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  ACK_TIMEOUT,
  ChatClient,
  Clients,
  RUN_ID,
  STEP_TIMEOUT,
  TRANSPORTS,
  URLS,
  intFromEnv,
  isRejection,
  ms,
  report,
  sequenceProblems,
  waitUntil,
  withTimeout,
} from './support.mjs';

const URL0 = URLS[0];
// The server's limits (its defaults unless the harness configured others).
const MAX_MESSAGE_CHARS = intFromEnv('CHORUS_MAX_MESSAGE_CHARS', 4096);
const MAX_CLIENT_OFFSET_CHARS = intFromEnv('CHORUS_MAX_CLIENT_OFFSET_CHARS', 128);
const TEST_TIMEOUT = ms(120_000);

const count = (client, content) => client.countOf(content);

function assertGapless(client) {
  assert.deepEqual(sequenceProblems(client.received), [], `${client.name}: offsets not consecutive`);
  assert.deepEqual(client.malformed, [], `${client.name}: malformed 'chat message' from the server`);
}

for (const transport of TRANSPORTS) {
  describe(`tutorial client on one node (${transport})`, () => {
    const prefix = `${RUN_ID}-tut-${transport}-`;

    test('chat, disconnect, reconnect with auth.serverOffset: only the missed messages, then live', { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      try {
        const A = clients.add(new ChatClient('A', URL0, { transport }));
        const B = clients.add(new ChatClient('B', URL0, { transport }));
        await Promise.all([A.connected(), B.connected()]);

        // A sends 5; every send acked, both clients get all 5 in order.
        const fromA = [0, 1, 2, 3, 4].map((i) => `${prefix}a${i}`);
        await Promise.all(fromA.map((c) => A.sendOk(c)));
        for (const c of [A, B]) {
          await waitUntil(() => c.receivedWith(`${prefix}a`).length >= fromA.length, {
            what: `${c.name} to receive A's ${fromA.length} messages`,
            detail: () => `got ${JSON.stringify(c.receivedWith(prefix))}`,
          });
        }
        const aOnA = A.receivedWith(`${prefix}a`);
        const aOnB = B.receivedWith(`${prefix}a`);
        assert.deepEqual(aOnA.map((m) => m.content), fromA, 'A: contents or order');
        assert.deepEqual(aOnB, aOnA, 'A and B disagree on (content, offset)');
        for (let i = 1; i < aOnA.length; i++) {
          assert.equal(aOnA[i].offset, aOnA[i - 1].offset + 1, `offsets not consecutive: ${JSON.stringify(aOnA)}`);
        }

        // A goes away; B sends 3.
        A.socket.disconnect();
        const lastSeenByA = A.lastOffset;
        assert.equal(lastSeenByA, A.received.at(-1).offset, 'socket.auth.serverOffset is the last offset A saw');
        const fromB = [0, 1, 2].map((i) => `${prefix}b${i}`);
        await Promise.all(fromB.map((c) => B.sendOk(c)));
        await waitUntil(() => B.receivedWith(`${prefix}b`).length >= fromB.length, {
          what: `B to receive its own ${fromB.length} messages`,
          detail: () => JSON.stringify(B.receivedWith(prefix)),
        });
        const bOnB = B.receivedWith(`${prefix}b`);
        assert.deepEqual(bOnB.map((m) => m.content), fromB);

        // A comes back (the tutorial's socket.connect(), same auth object).
        const mark = A.received.length;
        A.socket.connect();
        await A.connected();
        await waitUntil(() => A.received.length >= mark + fromB.length, {
          what: `A to receive the ${fromB.length} messages it missed (auth.serverOffset=${lastSeenByA})`,
          detail: () => `got ${JSON.stringify(A.received.slice(mark))}`,
        });
        const live = `${prefix}live`;
        await B.sendOk(live);
        await A.waitFor(live);
        await B.waitFor(live);
        const liveOnB = B.received.find((m) => m.content === live);
        assert.deepEqual(
          A.received.slice(mark),
          [...bOnB, liveOnB],
          'after reconnecting A must get exactly the missed messages, in order, then the live one',
        );

        // A fresh client may give the offset as a numeric string.
        const C = clients.add(new ChatClient('C', URL0, { transport, serverOffset: String(bOnB[1].offset) }));
        await C.connected();
        await C.waitFor(live);
        assert.deepEqual(C.received, [bOnB[2], liveOnB], 'C (serverOffset as a numeric string) gets what follows it');

        for (const c of [A, B, C]) assertGapless(c);
        const retries = A.retriesSeen + B.retriesSeen;
        assert.equal(retries, 0, 'a healthy server needs no client retries');
        report(
          `tutorial ${transport}: A got ${A.received.length} (replayed ${fromB.length} after reconnect from offset ${lastSeenByA}), ` +
            `B got ${B.received.length}, C got ${C.received.length}, acks ${fromA.length + fromB.length + 1}, retries ${retries}`,
        );
      } finally {
        clients.closeAll();
      }
    });

    test('older step: emit without clientOffset and without ack is stored and broadcast', { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      try {
        const A = clients.add(new ChatClient('A', URL0, { transport }));
        const B = clients.add(new ChatClient('B', URL0, { transport }));
        // The page of the "server delivery" step: io({ auth: { serverOffset: 0 } }), no retries.
        const O = clients.add(
          new ChatClient('O', URL0, {
            transport,
            ioOptions: { auth: { serverOffset: 0 }, transports: [transport], forceNew: true, reconnection: false },
          }),
        );
        await Promise.all([A.connected(), B.connected(), O.connected()]);

        // Tutorial options (retry queue) but no client offset and no callback.
        const bare = `${prefix}no-offset-queued`;
        A.sent++;
        A.socket.emit('chat message', bare);
        // The queue sends one packet at a time: this one only goes out once the bare
        // one was acked, so a quick ack here proves the bare emit was acked too.
        const next = `${prefix}after-no-offset`;
        const r = await withTimeout(
          A.send(next),
          ms(ACK_TIMEOUT / 2),
          `ack of the emit queued behind 'chat message' without clientOffset (is an emit without clientOffset acked?)`,
        );
        assert.ok(!r.err && !isRejection(r.res), `unexpected ack ${JSON.stringify(r)}`);

        // The older page: no ack requested at all.
        const older = `${prefix}no-offset-no-ack`;
        O.socket.emit('chat message', older);
        await B.waitFor(older);

        const barrier = `${prefix}older-barrier`;
        await A.sendOk(barrier);
        for (const c of [A, B, O]) await c.waitFor(barrier);
        for (const c of [A, B, O]) {
          for (const content of [bare, next, older, barrier]) {
            assert.equal(count(c, content), 1, `${c.name} must receive ${JSON.stringify(content)} exactly once`);
          }
          assertGapless(c);
        }
        assert.equal(A.retriesSeen, 0, 'the emit without clientOffset was retried: it was not acked in time');
        report(`older step ${transport}: 2 emits without clientOffset stored once each and broadcast to 3 clients`);
      } finally {
        clients.closeAll();
      }
    });

    test('same clientOffset sent twice (and from another socket): acked each time, delivered once', { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      try {
        const A = clients.add(new ChatClient('A', URL0, { transport }));
        const B = clients.add(new ChatClient('B', URL0, { transport }));
        await Promise.all([A.connected(), B.connected()]);

        const content = `${prefix}dup`;
        const clientOffset = `${RUN_ID}-${transport}-fixed-client-offset`;
        const [r1, r2] = await Promise.all([A.sendOk(content, clientOffset), A.sendOk(content, clientOffset)]);
        const r3 = await B.sendOk(content, clientOffset);

        const barrier = `${prefix}dup-barrier`;
        await A.sendOk(barrier);
        await A.waitFor(barrier);
        await B.waitFor(barrier);
        for (const c of [A, B]) {
          assert.equal(count(c, content), 1, `${c.name} must receive the message once, got ${count(c, content)}`);
          assertGapless(c);
        }
        report(
          `duplicate clientOffset ${transport}: 3 emits acked (${r1.ms}/${r2.ms}/${r3.ms} ms), delivered once to each of 2 clients`,
        );
      } finally {
        clients.closeAll();
      }
    });

    test('permanent rejections are acked with { error: { code, message } }; nothing stored; connection stays', { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      try {
        const A = clients.add(new ChatClient('A', URL0, { transport }));
        const B = clients.add(new ChatClient('B', URL0, { transport }));
        await Promise.all([A.connected(), B.connected()]);
        // A message before the rejections: B has its history by the time it gets this one.
        const pre = `${prefix}reject-pre`;
        await A.sendOk(pre);
        await B.waitFor(pre);
        const preOnB = B.received.find((m) => m.content === pre);
        const before = B.received.indexOf(preOnB) + 1;

        const cases = [
          ['empty content', ''],
          ['number content', 42],
          ['null content', null],
          ['object content', { text: `${prefix}object` }],
          ['number clientOffset', `${prefix}numeric-client-offset`, 12345],
          [`content of ${MAX_MESSAGE_CHARS + 1} chars`, `${prefix}long`.padEnd(MAX_MESSAGE_CHARS + 1, 'x')],
          [
            `clientOffset of ${MAX_CLIENT_OFFSET_CHARS + 1} chars`,
            `${prefix}long-client-offset`,
            `${RUN_ID}-${transport}-`.padEnd(MAX_CLIENT_OFFSET_CHARS + 1, 'o'),
          ],
        ];
        const codes = [];
        for (const [label, content, clientOffset] of cases) {
          const r = await withTimeout(
            clientOffset === undefined ? A.send(content) : A.send(content, clientOffset),
            STEP_TIMEOUT,
            `the ack of a ${label} (expected a rejection ack)`,
          );
          assert.equal(r.err, null, `${label}: no ack at all (${r.err?.message})`);
          assert.ok(isRejection(r.res), `${label}: expected { error: { code, message } }, got ${JSON.stringify(r.res)}`);
          assert.equal(typeof r.res.error.code, 'string', `${label}: error.code must be a string: ${JSON.stringify(r.res)}`);
          assert.equal(typeof r.res.error.message, 'string', `${label}: error.message must be a string: ${JSON.stringify(r.res)}`);
          assert.ok(A.socket.connected, `${label}: the connection must stay open`);
          codes.push(`${label}=${r.res.error.code}`);
        }

        // The barrier is exactly at both limits: accepted.
        const barrier = `${prefix}reject-barrier`.padEnd(MAX_MESSAGE_CHARS, '.');
        await A.sendOk(barrier, `${RUN_ID}-${transport}-at-limit-`.padEnd(MAX_CLIENT_OFFSET_CHARS, 'o'));
        await B.waitFor(barrier);
        assert.deepEqual(
          B.received.slice(before),
          [{ content: barrier, offset: preOnB.offset + 1 }],
          'nothing rejected may be stored or broadcast: the next message after the rejections takes the next offset',
        );
        assertGapless(B);
        assert.equal(A.retriesSeen, 0, 'rejections must be acked at the first try');
        report(`rejections ${transport}: ${codes.join(' ')}`);
      } finally {
        clients.closeAll();
      }
    });

    test('an invalid handshake serverOffset gets connect_error saying what is wrong', { timeout: TEST_TIMEOUT }, async () => {
      const clients = new Clients();
      try {
        for (const bad of ['abc', { nested: 1 }]) {
          const X = clients.add(new ChatClient('X', URL0, { transport, serverOffset: bad }));
          const err = await X.connectError();
          assert.match(err.message, /offset/i, `connect_error for serverOffset=${JSON.stringify(bad)} should name the offset: "${err.message}"`);
          report(`handshake ${transport}: serverOffset=${JSON.stringify(bad)} -> connect_error "${err.message}"`);
        }
      } finally {
        clients.closeAll();
      }
    });
  });
}
