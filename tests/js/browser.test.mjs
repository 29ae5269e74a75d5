// The page in a real browser: Debian's Chromium, headless, driven by playwright-core. Two people
// on two nodes (CHORUS_URLS: the first through the load balancer, the second straight to another
// node) chat in a room and in private; one presses Disconnect while the other keeps writing,
// connects again and sees every message once and in order; presence and typing show on the
// other page. Screenshots go to CHORUS_SHOTS.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [adaUrl, bobUrl] = process.env.CHORUS_URLS.split(',');
const shots = process.env.CHORUS_SHOTS;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = 15000;

async function person(browser, url, name, problems) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const page = await context.newPage();
  page.on('pageerror', (error) => problems.push(`${name}: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`${name}: ${message.text()}`);
  });
  await page.goto(url);
  await page.fill('#welcome-name', name);
  await page.click('#welcome-form button');
  await page.locator('#state', { hasText: 'connected' }).waitFor({ timeout: WAIT });
  return page;
}

async function joinRoom(page, room) {
  await page.fill('#join-name', room);
  await page.click('#join-form button');
  await page.locator('#title', { hasText: `# ${room}` }).waitFor({ timeout: WAIT });
}

async function say(page, text) {
  await page.fill('#input', text);
  await page.click('#form button');
}

/// The texts of the messages the page shows, and whether any is still pending or failed.
async function shown(page) {
  return page.$$eval('#messages > li', (items) => items.map((li) => ({
    text: li.querySelector('.text').textContent,
    who: li.querySelector('.who').textContent,
    state: li.classList.contains('pending') ? 'pending' : li.classList.contains('failed') ? 'failed' : 'stored',
  })));
}

async function until(what, check) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('two people on two nodes chat in a room and in private, and a reconnect loses nothing', async () => {
  mkdirSync(shots, { recursive: true });
  const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
  const problems = [];
  try {
    const ada = await person(browser, adaUrl, 'Ada', problems);
    const bob = await person(browser, bobUrl, 'Bob', problems);
    await joinRoom(ada, 'lobby');
    await joinRoom(bob, 'lobby');

    // Presence: each sees the other in the room's online list.
    await ada.locator('#people li', { hasText: 'Bob' }).waitFor({ timeout: WAIT });
    await bob.locator('#people li', { hasText: 'Ada' }).waitFor({ timeout: WAIT });

    // Typing shows on the other page.
    await bob.locator('#input').pressSequentially('hel');
    await ada.locator('#typing', { hasText: 'Bob is typing' }).waitFor({ timeout: WAIT });
    await bob.fill('#input', '');

    // A message: at once on the sender's page, confirmed by its ack, and on the other page.
    await say(ada, 'hello from Ada <b>not bold</b>');
    await bob.locator('#messages li', { hasText: 'hello from Ada' }).waitFor({ timeout: WAIT });
    await until('Ada\'s message confirmed', async () =>
      (await shown(ada)).some((m) => m.text.startsWith('hello from Ada') && m.state === 'stored'));
    assert.equal(await bob.locator('#messages b').count(), 0, 'content is text, never HTML');
    // A send the server refuses (longer than limits.max_message_chars) is marked, not lost.
    await say(ada, 'x'.repeat(5000));
    await ada.locator('#messages li.failed', { hasText: 'not sent' }).waitFor({ timeout: WAIT });
    await ada.screenshot({ path: join(shots, 'ada-lobby.png') });
    // Its 5000-character word wraps in the message list; the room list keeps its width.
    const nav = await ada.locator('nav').boundingBox();
    assert.ok(nav && nav.width > 150, `the room list was squeezed to ${nav?.width} px`);

    // Private: Ada clicks Bob in the online list and writes; Bob sees an unread conversation.
    await ada.click('#people li:has-text("Bob")');
    await ada.locator('#title', { hasText: '@ Bob' }).waitFor({ timeout: WAIT });
    await say(ada, 'psst, Bob');
    const convo = bob.locator('#rooms li', { hasText: '@ Ada' });
    await convo.locator('.unread', { hasText: '1' }).waitFor({ timeout: WAIT });
    await bob.screenshot({ path: join(shots, 'bob-unread.png') });
    await convo.click();
    await bob.locator('#messages li', { hasText: 'psst, Bob' }).waitFor({ timeout: WAIT });
    await say(bob, 'hi Ada');
    await ada.locator('#messages li', { hasText: 'hi Ada' }).waitFor({ timeout: WAIT });
    await bob.screenshot({ path: join(shots, 'bob-private.png') });

    // Bob disconnects in the lobby while Ada keeps writing there and in private.
    await bob.click('#rooms li:has-text("# lobby")');
    await ada.click('#rooms li:has-text("# lobby")');
    await bob.click('#toggle');
    await bob.locator('#state', { hasText: 'disconnected' }).waitFor({ timeout: WAIT });
    const missed = ['one', 'two', 'three', 'four', 'five'].map((n) => `while you were away: ${n}`);
    for (const text of missed) await say(ada, text);
    await until('Ada\'s messages stored', async () =>
      (await shown(ada)).filter((m) => m.text.startsWith('while you were away') && m.state === 'stored').length === 5);
    await ada.click('#rooms li:has-text("@ Bob")');
    await say(ada, 'and one in private');
    await bob.click('#toggle');
    await bob.locator('#state', { hasText: 'connected' }).waitFor({ timeout: WAIT });
    await until('the missed messages', async () =>
      (await shown(bob)).filter((m) => m.text.startsWith('while you were away')).length >= 5);
    const lobby = (await shown(bob)).map((m) => m.text);
    assert.deepEqual(lobby, ['hello from Ada <b>not bold</b>', ...missed], 'every message once, in order');
    await bob.locator('#rooms li:has-text("@ Ada") .unread', { hasText: '1' }).waitFor({ timeout: WAIT });
    // Bob is back: the conversation Ada is in shows him online again.
    await ada.locator('#people li', { hasText: 'Bob' }).waitFor({ timeout: WAIT });
    assert.equal(await bob.locator('#typing').textContent(), '', 'nobody is still typing');
    await bob.screenshot({ path: join(shots, 'bob-after-reconnect.png') });
    await ada.screenshot({ path: join(shots, 'ada-private.png') });

    // Readable on a phone: the room list folds behind the menu button.
    await bob.setViewportSize({ width: 390, height: 740 });
    assert.equal(await bob.locator('nav').isVisible(), false, 'the room list is folded away');
    await bob.click('#menu');
    assert.equal(await bob.locator('nav').isVisible(), true, 'the menu opens the room list');
    await bob.screenshot({ path: join(shots, 'bob-phone.png') });

    assert.deepEqual(problems, [], 'no errors on the pages');
  } finally {
    await browser.close();
  }
});
