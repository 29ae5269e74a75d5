// The baseline for chorus-bench: the Socket.IO tutorial's chat server (server delivery with
// client offsets and acks), deployed as a Node.js user scales it out: socket.io 4.8 on several
// nodes sharing broadcasts through @socket.io/redis-adapter, messages in Postgres through `pg`
// (one INSERT per message, then io.emit), and the tutorial's replay query on connect.
//
//   PORT=3101 DATABASE_URL=postgres://... REDIS_URL=redis://... [REDIS_KEY=...] node server.mjs
//
// The first node creates the table; start it before the others.

import { createServer } from 'node:http';

import { createAdapter } from '@socket.io/redis-adapter';
import pg from 'pg';
import { createClient } from 'redis';
import { Server } from 'socket.io';

const port = Number(process.env.PORT ?? 3101);
const databaseUrl = process.env.DATABASE_URL;
const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
if (!databaseUrl) throw new Error('DATABASE_URL is not set');

const pool = new pg.Pool({ connectionString: databaseUrl });
await pool.query(`
  CREATE TABLE IF NOT EXISTS messages (
    id SERIAL PRIMARY KEY,
    client_offset TEXT UNIQUE,
    content TEXT
  )`);

const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();
await Promise.all([pubClient.connect(), subClient.connect()]);

const server = createServer((req, res) => {
  // Readiness for the bench script.
  res.writeHead(req.url === '/readyz' ? 200 : 404).end();
});
const io = new Server(server, {
  connectionStateRecovery: {},
  // REDIS_KEY keeps several benchmark clusters on one Redis apart.
  adapter: createAdapter(pubClient, subClient, { key: process.env.REDIS_KEY ?? 'socket.io' }),
});

io.on('connection', async (socket) => {
  socket.on('chat message', async (msg, clientOffset, callback) => {
    let result;
    try {
      result = await pool.query('INSERT INTO messages (content, client_offset) VALUES ($1, $2) RETURNING id', [
        msg,
        clientOffset,
      ]);
    } catch (e) {
      if (e.code === '23505' /* unique_violation */) {
        callback?.();
      } else {
        // nothing to do, just let the client retry
      }
      return;
    }
    io.emit('chat message', msg, result.rows[0].id);
    callback?.();
  });

  if (!socket.recovered) {
    try {
      const { rows } = await pool.query('SELECT id, content FROM messages WHERE id > $1 ORDER BY id', [
        socket.handshake.auth.serverOffset || 0,
      ]);
      for (const row of rows) socket.emit('chat message', row.content, row.id);
    } catch (e) {
      // something went wrong
    }
  }
});

server.listen(port, '127.0.0.1', () => console.log(`baseline listening on http://127.0.0.1:${port}`));

// Handlers still running when the node stops may emit after Redis is gone; exit at once.
const stop = () => {
  io.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
