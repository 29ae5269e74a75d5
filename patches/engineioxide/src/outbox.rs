//! The packets waiting to be written to one session: a bounded queue and a one-packet volatile
//! slot, held inline in the [`Socket`](crate::Socket).
//!
//! (chorus patch, see PATCH.md.) Published, these are a tokio `mpsc` channel and a `watch`
//! channel: about 6.4 KB allocated per session whether or not anything waits (the channel's
//! first block holds 32 packet buffers of 168 bytes, and each channel's shared state is padded
//! to cache lines). Here the queue allocates only while packets wait: a drained queue gives its
//! buffer back, so an idle session holds none (one allocation per batch written, against a
//! write to the socket). One reader at a time (the transport holding the socket's `internal_rx`
//! lock) takes packets out; any number of senders put them in.
use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use engineioxide_core::PacketBuf;
use tokio::sync::{Notify, mpsc::error::TrySendError};

pub(crate) struct Outbox {
    capacity: usize,
    state: Mutex<State>,
    /// Woken when the outbox is closed, for [`Outbox::closed`].
    closing: Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<PacketBuf>,
    /// Slots promised to [`Reserved`] permits not yet used.
    reserved: usize,
    /// The latest volatile packets, replaced by the next ones if not yet written (boxed: rare,
    /// and a packet buffer is 168 bytes).
    volatile: Option<Box<PacketBuf>>,
    closed: bool,
    /// The reader waiting for packets.
    reader: Option<Waker>,
}

impl Outbox {
    /// An outbox holding at most `capacity` packet buffers (reserved ones included).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::new(State::default()),
            closing: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the packets if there is room and the outbox is open.
    // The packets are handed back on failure, as a tokio channel's `try_send` does.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_send(&self, packets: PacketBuf) -> Result<(), TrySendError<PacketBuf>> {
        let mut state = self.lock();
        if state.closed {
            return Err(TrySendError::Closed(packets));
        }
        if state.queue.len() + state.reserved >= self.capacity {
            return Err(TrySendError::Full(packets));
        }
        let reader = state.push(packets);
        drop(state);
        wake(reader);
        Ok(())
    }

    /// Queues the packets even when the queue is full (for the upgrade's noop, which answers a
    /// pending polling request); `Err` if the outbox is closed.
    #[allow(clippy::result_large_err)]
    pub(crate) fn push(&self, packets: PacketBuf) -> Result<(), PacketBuf> {
        let mut state = self.lock();
        if state.closed {
            return Err(packets);
        }
        let reader = state.push(packets);
        drop(state);
        wake(reader);
        Ok(())
    }

    /// Holds one slot for packets sent later through the returned permit.
    pub(crate) fn try_reserve(&self) -> Result<Reserved<'_>, TrySendError<()>> {
        let mut state = self.lock();
        if state.closed {
            return Err(TrySendError::Closed(()));
        }
        if state.queue.len() + state.reserved >= self.capacity {
            return Err(TrySendError::Full(()));
        }
        state.reserved += 1;
        Ok(Reserved { outbox: self })
    }

    /// Replaces the volatile packets not yet written; `false` if the outbox is closed.
    pub(crate) fn send_volatile(&self, packets: PacketBuf) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.volatile = Some(Box::new(packets));
        let reader = state.reader.take();
        drop(state);
        wake(reader);
        true
    }

    /// No more packets are accepted; those already queued can still be taken out.
    pub(crate) fn close(&self) {
        let reader = {
            let mut state = self.lock();
            state.closed = true;
            state.reader.take()
        };
        wake(reader);
        self.closing.notify_waiters();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Resolves once the outbox is closed.
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.closing.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// The next queued packets; `None` once the outbox is closed and drained.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<PacketBuf>> {
        let mut state = self.lock();
        if let Some(packets) = state.take_next() {
            return Poll::Ready(Some(packets));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.register(cx);
        Poll::Pending
    }

    /// The next queued packets, if any are waiting.
    pub(crate) fn try_recv(&self) -> Option<PacketBuf> {
        self.lock().take_next()
    }

    /// The volatile packets, once there are some.
    pub(crate) fn poll_volatile(&self, cx: &mut Context<'_>) -> Poll<PacketBuf> {
        let mut state = self.lock();
        if let Some(packets) = state.volatile.take() {
            return Poll::Ready(*packets);
        }
        state.register(cx);
        Poll::Pending
    }
}

impl State {
    /// Queues the packets and returns the reader to wake.
    fn push(&mut self, packets: PacketBuf) -> Option<Waker> {
        self.queue.push_back(packets);
        self.reader.take()
    }

    fn take_next(&mut self) -> Option<PacketBuf> {
        let packets = self.queue.pop_front()?;
        if self.queue.is_empty() {
            self.queue = VecDeque::new();
        }
        Some(packets)
    }

    fn register(&mut self, cx: &mut Context<'_>) {
        match &mut self.reader {
            Some(waker) => waker.clone_from(cx.waker()),
            None => self.reader = Some(cx.waker().clone()),
        }
    }
}

fn wake(reader: Option<Waker>) {
    if let Some(reader) = reader {
        reader.wake();
    }
}

/// One slot of an [`Outbox`], held until packets are sent through it or it is dropped.
pub(crate) struct Reserved<'a> {
    outbox: &'a Outbox,
}

impl Reserved<'_> {
    /// Queues the packets in the reserved slot (dropped if the outbox closed meanwhile).
    pub(crate) fn send(self, packets: PacketBuf) {
        let outbox = self.outbox;
        // The slot is given back here, not by `Drop`.
        std::mem::forget(self);
        let mut state = outbox.lock();
        state.reserved -= 1;
        if state.closed {
            return;
        }
        let reader = state.push(packets);
        drop(state);
        wake(reader);
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.outbox.lock().reserved -= 1;
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Outbox")
            .field("capacity", &self.capacity)
            .field("queued", &state.queue.len())
            .field("reserved", &state.reserved)
            .field("closed", &state.closed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        task::Wake,
    };

    use engineioxide_core::{Packet, Str};
    use smallvec::smallvec;

    use super::*;

    fn message(text: &'static str) -> PacketBuf {
        smallvec![Packet::Message(Str::from(text))]
    }

    fn text(packets: PacketBuf) -> String {
        match packets.into_iter().next() {
            Some(Packet::Message(msg)) => msg.to_string(),
            other => panic!("not a message: {other:?}"),
        }
    }

    #[test]
    fn packets_come_out_in_the_order_they_went_in() {
        let outbox = Outbox::new(8);
        for t in ["a", "b", "c"] {
            outbox.try_send(message(t)).unwrap();
        }
        let out: Vec<String> = std::iter::from_fn(|| outbox.try_recv()).map(text).collect();
        assert_eq!(out, ["a", "b", "c"]);
    }

    #[test]
    fn a_full_outbox_refuses_and_hands_the_packets_back() {
        let outbox = Outbox::new(2);
        outbox.try_send(message("a")).unwrap();
        let permit = outbox.try_reserve().unwrap();
        match outbox.try_send(message("b")) {
            Err(TrySendError::Full(p)) => assert_eq!(text(p), "b"),
            other => panic!("expected full, got {other:?}"),
        }
        assert!(matches!(outbox.try_reserve(), Err(TrySendError::Full(()))));
        // A dropped permit gives its slot back; a used one fills it.
        drop(permit);
        outbox.try_reserve().unwrap().send(message("c"));
        assert!(outbox.try_send(message("d")).is_err());
        assert_eq!(text(outbox.try_recv().unwrap()), "a");
        assert_eq!(text(outbox.try_recv().unwrap()), "c");
        assert!(outbox.try_recv().is_none());
    }

    #[test]
    fn a_closed_outbox_refuses_but_gives_out_what_it_holds() {
        let outbox = Outbox::new(4);
        outbox.try_send(message("a")).unwrap();
        let permit = outbox.try_reserve().unwrap();
        outbox.close();
        assert!(outbox.is_closed());
        assert!(matches!(
            outbox.try_send(message("b")),
            Err(TrySendError::Closed(_))
        ));
        assert!(outbox.push(message("b")).is_err());
        assert!(!outbox.send_volatile(message("v")));
        permit.send(message("late"));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            matches!(outbox.poll_recv(&mut cx), Poll::Ready(Some(p)) if text(p.clone()) == "a")
        );
        assert!(matches!(outbox.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn a_drained_queue_gives_back_its_buffer() {
        let outbox = Outbox::new(1024);
        for _ in 0..100 {
            outbox.try_send(message("x")).unwrap();
        }
        assert!(outbox.lock().queue.capacity() >= 100);
        for _ in 0..99 {
            outbox.try_recv().unwrap();
        }
        assert!(outbox.lock().queue.capacity() >= 1);
        outbox.try_recv().unwrap();
        assert_eq!(outbox.lock().queue.capacity(), 0);
    }

    #[test]
    fn only_the_latest_volatile_packets_are_written() {
        let outbox = Outbox::new(4);
        assert!(outbox.send_volatile(message("1")));
        assert!(outbox.send_volatile(message("2")));
        let mut cx = Context::from_waker(Waker::noop());
        match outbox.poll_volatile(&mut cx) {
            Poll::Ready(p) => assert_eq!(text(p), "2"),
            Poll::Pending => panic!("volatile packets were sent"),
        }
        assert!(outbox.poll_volatile(&mut cx).is_pending());
    }

    /// A waker that records whether it was woken.
    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    fn flag() -> (Arc<Flag>, Waker) {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        (flag.clone(), Waker::from(flag))
    }

    #[test]
    fn a_waiting_reader_is_woken_by_a_sender_a_permit_a_volatile_send_and_the_close() {
        let outbox = Outbox::new(4);
        let wakes: [&dyn Fn(&Outbox); 4] = [
            &|o| o.try_send(message("sent")).unwrap(),
            &|o| o.try_reserve().unwrap().send(message("reserved")),
            &|o| assert!(o.send_volatile(message("volatile"))),
            &|o| o.close(),
        ];
        for wake in wakes {
            let (woken, waker) = flag();
            let mut cx = Context::from_waker(&waker);
            while outbox.try_recv().is_some() {}
            let _ = outbox.poll_volatile(&mut Context::from_waker(Waker::noop()));
            assert!(outbox.poll_recv(&mut cx).is_pending());
            assert!(outbox.poll_volatile(&mut cx).is_pending());
            wake(&outbox);
            assert!(woken.0.load(Ordering::SeqCst), "the reader was not woken");
        }
    }

    #[test]
    fn closed_resolves_when_the_outbox_closes() {
        let outbox = Outbox::new(4);
        let (woken, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let closed = outbox.closed();
        let mut closed = std::pin::pin!(closed);
        assert!(closed.as_mut().poll(&mut cx).is_pending());
        outbox.close();
        assert!(woken.0.load(Ordering::SeqCst), "the waiter was not woken");
        assert!(closed.as_mut().poll(&mut cx).is_ready());
    }
}
