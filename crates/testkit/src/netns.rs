//! Test hosts in network namespaces, and the faults of a real network on their links.
//!
//! A [`TestNet`] is a bridge in the test's own namespace (its address, the gateway, is where
//! the test's Postgres, Redis and balancer listen) and one namespace per [`Host`], joined to
//! the bridge by a veth pair whose inner end is `eth0`. Every peer of a host is the gateway,
//! so a host's faults are rules on its own `eth0`, made with Debian's iproute2 and iptables:
//!
//! - **Partitions** ([`Cut`]): `DROP` rules, both directions, for a peer's port, the host's own
//!   listening port (its clients), or everything.
//! - **A bad link** ([`Netem`]): loss as a random `DROP` (the `statistic` match), duplication as
//!   a random `TEE` clone to the gateway, and delay with jitter (which reorders) by an NFQUEUE
//!   reader in this process that holds each outgoing packet until it is due. This kernel has no
//!   `sch_netem`, so the delay is done in user space; what reaches the wire is the same.
//!
//! Names carry the creating process's id, and a new net first removes every namespace and link
//! left by a process that no longer runs, so a test killed half-way leaves nothing for long;
//! dropping a [`TestNet`] removes its own.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command as StdCommand,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The netfilter queue each host's delayer reads (queues are per namespace).
const QUEUE: u16 = 0;
/// Packets the kernel holds for the delayer before it lets more through unqueued.
const QUEUE_MAX_LEN: u32 = 65_536;
/// The interface of a host on the bridge.
const IFACE: &str = "eth0";
/// Prefixes of everything a net creates: namespaces, the bridge, the host-side veths.
const NS_PREFIX: &str = "chorus-";
const BRIDGE_PREFIX: &str = "chb";
const VETH_PREFIX: &str = "chv";

/// Nets this process made, for unique names and subnets.
static NETS: AtomicU32 = AtomicU32::new(0);

/// Runs `program args`; fails the test with its output when it fails.
fn run(program: &str, args: &[&str]) {
    let out = StdCommand::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("run {program} ({e}); scripts/provision installs iproute2 and iptables")
        });
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The output of `program args`, empty when it fails.
fn output(program: &str, args: &[&str]) -> String {
    StdCommand::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The creator's pid in a name `{prefix}{pid}x...` or `{prefix}{pid}-...`.
fn creator(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Removes the namespaces and links of nets whose creating process has exited.
fn prune_stale() {
    for line in output("ip", &["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if creator(name, NS_PREFIX).is_some_and(|pid| !process_alive(pid)) {
            let _ = StdCommand::new("ip").args(["netns", "del", name]).status();
        }
    }
    for line in output("ip", &["-o", "link", "show"]).lines() {
        // "7: chb123x0: <...>" or "8: chv123x01@if2: <...>"
        let Some(name) = line.split(':').nth(1).map(str::trim) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or_default();
        let stale = [BRIDGE_PREFIX, VETH_PREFIX]
            .iter()
            .any(|p| creator(name, p).is_some_and(|pid| !process_alive(pid)));
        if stale {
            let _ = StdCommand::new("ip").args(["link", "del", name]).status();
        }
    }
}

/// A bridge and hosts on it; everything is removed when it is dropped.
pub struct TestNet {
    bridge: String,
    gateway: Ipv4Addr,
    hosts: Vec<Host>,
}

impl TestNet {
    /// A bridge with `count` hosts (at most 9), each in a namespace of its own.
    pub fn create(count: usize) -> TestNet {
        assert!((1..=9).contains(&count), "1 to 9 hosts");
        prune_stale();
        let pid = std::process::id();
        let k = NETS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}x{k}");
        // A /24 per net, from the pid and the count: 10.64.0.0 to 10.191.255.0.
        let n = pid.wrapping_mul(8).wrapping_add(k) % (128 * 256);
        let (b, c) = (64 + (n / 256) as u8, (n % 256) as u8);
        let gateway = Ipv4Addr::new(10, b, c, 1);
        let bridge = format!("{BRIDGE_PREFIX}{tag}");
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        let mut net = TestNet {
            bridge: bridge.clone(),
            gateway,
            hosts: Vec::new(),
        };
        run(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &bridge],
        );
        run("ip", &["link", "set", &bridge, "up"]);
        for i in 0..count {
            let ns = format!("{NS_PREFIX}{pid}-{k}-{i}");
            let veth = format!("{VETH_PREFIX}{tag}{i}");
            let ip = Ipv4Addr::new(10, b, c, 10 + i as u8);
            run("ip", &["netns", "add", &ns]);
            net.hosts.push(Host {
                ns: ns.clone(),
                ip,
                gateway,
                delayer: Mutex::new(None),
            });
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", IFACE, "netns", &ns,
                ],
            );
            run("ip", &["link", "set", &veth, "master", &bridge, "up"]);
            let host = &net.hosts[i];
            host.ip_cmd(&["addr", "add", &format!("{ip}/24"), "dev", IFACE]);
            host.ip_cmd(&["link", "set", IFACE, "up"]);
            host.ip_cmd(&["link", "set", "lo", "up"]);
            host.ip_cmd(&["route", "add", "default", "via", &gateway.to_string()]);
            // The chains every fault goes into, so healing is flushing them.
            host.iptables(&["-N", "NEMESIS"]);
            host.iptables(&["-A", "INPUT", "-j", "NEMESIS"]);
            host.iptables(&["-A", "OUTPUT", "-j", "NEMESIS"]);
            host.iptables(&["-t", "mangle", "-N", "NEMESIS"]);
            host.iptables(&["-t", "mangle", "-A", "POSTROUTING", "-j", "NEMESIS"]);
        }
        net
    }

    /// The test's own address on the bridge: where the hosts reach Postgres, Redis and the
    /// balancer.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for host in &self.hosts {
            host.stop_delayer();
            // Deleting the namespace deletes its veth end, and with it the peer on the bridge.
            let _ = StdCommand::new("ip")
                .args(["netns", "del", &host.ns])
                .status();
        }
        let _ = StdCommand::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// What a partition cuts a host off from.
#[derive(Debug, Clone)]
pub enum Cut {
    /// The services on these ports of the gateway (Postgres, Redis).
    Peers(Vec<u16>),
    /// Whoever connects to the host's own port (its clients, the balancer, probes).
    Clients(u16),
    /// Everything.
    All,
}

/// A bad link, on the host's side: what `tc qdisc ... netem` would be given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Netem {
    /// Each packet the host sends waits this long...
    pub delay: Duration,
    /// ...plus or minus up to this much, drawn for each packet (later packets overtake).
    pub jitter: Duration,
    /// Share of packets dropped, each way.
    pub loss: f64,
    /// Share of sent packets that go out twice.
    pub duplicate: f64,
    /// Share of sent packets that go out at once, ahead of delayed ones.
    pub reorder: f64,
}

/// One host: a network namespace with an address on the bridge.
pub struct Host {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub ns: String,
    pub ip: Ipv4Addr,
    gateway: Ipv4Addr,
    delayer: Mutex<Option<Delayer>>,
}

impl Host {
    fn ip_cmd(&self, args: &[&str]) {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn iptables(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", self.ns.as_str(), "iptables", "-w"];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Cuts the host off from `cut`, both ways, until [`Host::heal`].
    pub fn partition(&self, cut: &Cut) {
        let gw = self.gateway.to_string();
        match cut {
            Cut::Peers(ports) => {
                for port in ports {
                    let port = port.to_string();
                    self.drop_matching(&["-o", IFACE, "-p", "tcp", "-d", &gw, "--dport", &port]);
                    self.drop_matching(&["-i", IFACE, "-p", "tcp", "-s", &gw, "--sport", &port]);
                }
            }
            Cut::Clients(port) => {
                let port = port.to_string();
                self.drop_matching(&["-i", IFACE, "-p", "tcp", "--dport", &port]);
                self.drop_matching(&["-o", IFACE, "-p", "tcp", "--sport", &port]);
            }
            Cut::All => {
                self.drop_matching(&["-i", IFACE]);
                self.drop_matching(&["-o", IFACE]);
            }
        }
    }

    /// A fault rule: drop what `matching` matches.
    fn drop_matching(&self, matching: &[&str]) {
        let mut rule = vec!["-A", "NEMESIS"];
        rule.extend_from_slice(matching);
        rule.extend_from_slice(&["-j", "DROP"]);
        self.iptables(&rule);
    }

    /// Makes the host's link bad, until [`Host::heal`]; `seed` draws the delays.
    pub fn netem(&self, netem: Netem, seed: u64) {
        let random = |share: f64| format!("{share:.4}");
        if netem.loss > 0.0 {
            let loss = random(netem.loss);
            for dir in ["-i", "-o"] {
                let statistic = ["-m", "statistic", "--mode", "random", "--probability"];
                let mut matching = vec![dir, IFACE];
                matching.extend_from_slice(&statistic);
                matching.push(&loss);
                self.drop_matching(&matching);
            }
        }
        if netem.duplicate > 0.0 {
            self.iptables(&[
                "-t",
                "mangle",
                "-A",
                "NEMESIS",
                "-o",
                IFACE,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &random(netem.duplicate),
                "-j",
                "TEE",
                "--gateway",
                &self.gateway.to_string(),
            ]);
        }
        if !netem.delay.is_zero() || !netem.jitter.is_zero() {
            let delayer = Delayer::start(&self.ns, netem, seed)
                .unwrap_or_else(|e| panic!("the delayer of {} could not start: {e}", self.ns));
            *self.delayer.lock().expect("delayer lock") = Some(delayer);
            // After the loss rule, so dropped packets are not held first; NFQUEUE ends the
            // chain for the packets it takes. Bypass: without a reader, packets pass.
            self.iptables(&[
                "-A",
                "NEMESIS",
                "-o",
                IFACE,
                "-j",
                "NFQUEUE",
                "--queue-num",
                &QUEUE.to_string(),
                "--queue-bypass",
            ]);
        }
    }

    /// Removes every fault: the rules first, then the packets the delayer holds go out.
    pub fn heal(&self) {
        self.iptables(&["-F", "NEMESIS"]);
        self.iptables(&["-t", "mangle", "-F", "NEMESIS"]);
        self.stop_delayer();
    }

    fn stop_delayer(&self) {
        let delayer = self
            .delayer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(delayer) = delayer {
            delayer.stop();
        }
    }
}

/// A thread inside a host's namespace that takes its queued packets and lets each go when due.
struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    fn start(ns: &str, netem: Netem, seed: u64) -> std::io::Result<Delayer> {
        let path = format!("/var/run/netns/{ns}");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("delayer {ns}"))
                .spawn(move || {
                    let queue = open_queue_in(&path);
                    let ok = queue.as_ref().map(|_| ()).map_err(|e| e.to_string());
                    let _ = ready_tx.send(ok);
                    if let Ok(queue) = queue {
                        delay_loop(queue, netem, seed, &stop);
                    }
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Delayer {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::other("the delayer thread ended")),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves this thread into the namespace at `path` and binds its netfilter queue there.
fn open_queue_in(path: &str) -> std::io::Result<nfq::Queue> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns on a namespace file this thread opened; it changes only this thread's
    // network namespace, which is all this thread is for.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut queue = nfq::Queue::open()?;
    queue.bind(QUEUE)?;
    // Only the headers are needed: the verdict leaves the packet as it is.
    queue.set_copy_range(QUEUE, 64)?;
    queue.set_queue_max_len(QUEUE, QUEUE_MAX_LEN)?;
    queue.set_fail_open(QUEUE, true)?;
    queue.set_nonblocking(true);
    Ok(queue)
}

/// Holds each packet for its delay; releases everything when told to stop.
fn delay_loop(mut queue: nfq::Queue, netem: Netem, seed: u64, stop: &AtomicBool) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut held: BTreeMap<(Instant, u64), nfq::Message> = BTreeMap::new();
    let mut seq = 0u64;
    let base = netem.delay.as_secs_f64();
    let jitter = netem.jitter.as_secs_f64();
    while !stop.load(Ordering::Relaxed) {
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    msg.set_verdict(nfq::Verdict::Accept);
                    let now = Instant::now();
                    let due = if rng.f64() < netem.reorder {
                        now
                    } else {
                        let d = (base + jitter * (2.0 * rng.f64() - 1.0)).max(0.0);
                        now + Duration::from_secs_f64(d)
                    };
                    seq += 1;
                    held.insert((due, seq), msg);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "delayer recv");
                    break;
                }
            }
        }
        let now = Instant::now();
        while let Some(entry) = held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let msg = entry.remove();
            if let Err(e) = queue.verdict(msg) {
                tracing::warn!(error = %e, "delayer verdict");
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (_, msg) in std::mem::take(&mut held) {
        let _ = queue.verdict(msg);
    }
    let _ = queue.unbind(QUEUE);
}
